"""The Ray backend on a two-node ``ray.cluster_utils.Cluster``: one Ray actor per device,
real gRPC between worker processes. The same plans give the same losses as the driver's own
executor; a worker process killed mid-step is reported by rank and op within the timeout.

The Ray cluster is started once per test session (``conftest.ray_cluster``) and the workers
once per module; together these tests take well under the five minutes CI allows them.
"""

import os
import signal
import threading
import time

import numpy as np
import pytest

import flowsys as fs
from actors import runtime
from actors.backends import RankFailed
from test_actors import MICRO, _overlaps, _TwoStages
from test_graph import _run

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def ray_backend(ray_cluster):
    backend = fs.init(backend="ray", timeout=TIMEOUT, shared_memory=False)  # every byte over gRPC streams
    yield backend
    fs.shutdown()


LAYOUTS = {
    "one device": (None, None, None),
    "dp2": ([0, 1], 0, None),
    "tp2": ([0, 1], None, 0),
    "dp2xtp2": ([[0, 1], [2, 3]], 0, 1),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["mlp", "gpt"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ray_backend_gives_the_same_losses(ray_backend, kind, layout):
    mesh, dp, tp = LAYOUTS[layout]
    if mesh is None:
        mesh, dp = [0], 0  # one device: a one-rank placement, so the step runs in a worker
    expected, _ = _run(kind, "graph", mesh, dp, tp, executor="global")
    got, step = _run(kind, "graph", mesh, dp, tp, executor="auto")
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert step.timeline == [] and step.ir.micro_batches == 1


@pytest.mark.timeout(60)
def test_workers_are_spread_over_both_nodes(ray_backend):
    _run("mlp", "graph", [[0, 1], [2, 3]], 0, 1, executor="auto")
    nodes = ray_backend.nodes()
    assert sorted(nodes) == [0, 1, 2, 3]
    assert len(set(nodes.values())) == 2
    assert len(set(ray_backend.pids().values())) == 4 and os.getpid() not in ray_backend.pids().values()


@pytest.mark.timeout(60)
def test_pipeline_overlaps_across_worker_processes(ray_backend):
    step = _TwoStages(registers=2)
    x, y = step.batch()
    seen = set()
    for _ in range(4):
        step(x, y)
        assert {f.piece for f in step.timeline if f.phase != "optimizer"} - {runtime.PER_STEP_PIECE} == set(range(MICRO))
        seen |= _overlaps(step.timeline)
    assert seen, "stage 0 never worked on micro-batch i+1 while stage 1 worked on micro-batch i"


@pytest.mark.timeout(240)
def test_3d_parallel_gpt_on_ray(ray_backend):
    """dp2 x tp2 x pp2 with ZeRO 1 on eight Ray workers: the losses of one device."""
    from test_pipeline import _train

    expected, _ = _train(4, executor="global")
    got, step = _train(4, mesh3d=True, zero=1, executor="auto")
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert sorted(ray_backend.pids()) == list(range(8))


@pytest.mark.timeout(120)
def test_a_steady_step_over_ray_moves_a_few_kib_per_rank(ray_backend):
    """Parameters created and kept in the Ray workers, batches read there: a step's Ray calls
    carry a small request and response per rank, whatever the model's width."""
    from test_driver import LIMIT, WIDE, _train

    from flowsys.data import ByteDataset

    _, step, traffic = _train("dp2", ByteDataset.from_stdlib(1 << 16), WIDE)
    for later in traffic[1:]:
        assert all(sent + back <= LIMIT for sent, back in later.values()), later


@pytest.mark.timeout(120)
def test_killing_a_worker_mid_step_names_it_within_the_timeout(ray_backend):
    step = _TwoStages(registers=1, width=1024)  # ops of milliseconds, so the kill lands inside one
    x, y = step.batch()
    saved = [{k: v.numpy() for k, v in m.state_dict().items()} for m in (step.s0, step.s1)]
    step(x, y)  # warm: workers up, plan loaded, the parameters' newest values in them
    victim = ray_backend.pids()[1]

    def kill_when_busy():  # as soon as rank 1 reports an op of the next step, kill its process
        # (its last report may still be an op of the warm step: wait for it to say idle first)
        while ray_backend._statuses(ray_backend.driver.mailbox).get(1, "idle") != "idle":
            time.sleep(0.001)
        while ray_backend._statuses(ray_backend.driver.mailbox).get(1, "idle") == "idle":
            time.sleep(0.001)
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    start = time.monotonic()
    with pytest.raises(RankFailed, match=rf"rank 1 failed while running \w+ \(op \d+, (piece \d|per step)\): its worker process \(pid {victim}\) died"):
        for _ in range(50):  # steps until the kill lands
            step(x, y)
    assert time.monotonic() - start < TIMEOUT
    # the parameters lived in the workers: going on needs them back, said plainly
    for _ in range(2):  # and stays so: no stale values are used
        with pytest.raises(fs.GraphError, match="restarted after a failure; load a checkpoint"):
            step(x, y)
    step.s0.load_state_dict(saved[0])  # what fs.checkpoint.load does
    step.s1.load_state_dict(saved[1])
    # the next step starts fresh workers and runs
    assert np.isfinite(float(step(x, y)))
    assert victim not in ray_backend.pids().values()


@pytest.mark.timeout(120)
def test_same_host_ranks_share_memory_and_agree(ray_backend):
    """Last in the module: it replaces the module's backend with one using shared memory."""
    fs.init(backend="ray", timeout=TIMEOUT, shared_memory=True)
    expected, _ = _run("gpt", "graph", [[0, 1], [2, 3]], 0, 1, executor="global")
    got, _ = _run("gpt", "graph", [[0, 1], [2, 3]], 0, 1, executor="auto")
    np.testing.assert_allclose(got, expected, rtol=1e-5)
