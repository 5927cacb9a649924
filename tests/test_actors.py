"""The actor runtime and the local backend: register-based actors, pipelining with
back-pressure, failures reported by rank, and the worker's wire format.

Ray and gRPC run in ``test_ray.py``; here every rank is a thread of this process.
"""

import time

import numpy as np
import pytest

import flowsys as fs
from actors import backends, runtime
from actors.worker import WireError, decode, encode
from flowsys import nn, optim
from flowsys.planformat import plan_pb2

B = fs.sbp.broadcast
S = fs.sbp.split


@pytest.fixture(autouse=True)
def _no_backend():
    yield
    fs.shutdown()


# ----------------------------------------------------------------------------- pipelining
D = 256
MICRO = 4


class _TwoStages(fs.Graph):
    """A two-stage pipeline: stage 0 on rank 0, stage 1 on rank 1, activations sent between."""

    def __init__(self, registers: int, accumulation: int = MICRO, width: int = D):
        super().__init__()
        fs.manual_seed(0)
        self.width = width
        self.p0, self.p1 = fs.placement("cpu", [0]), fs.placement("cpu", [1])
        self.s0 = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)).to_global(self.p0, B)
        self.s1 = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4)).to_global(self.p1, B)
        self.add_optimizer(optim.SGD(list(self.s0.parameters()) + list(self.s1.parameters()), lr=0.05))
        self.config.gradient_accumulation_steps = accumulation
        self.config.registers = registers
        self.config.executor = "plans"
        self.config.record_timeline = True

    def build(self, x, y):
        h = self.s0(x).to_global(placement=self.p1, sbp=B)
        loss = ((self.s1(h) - y) ** 2).mean()
        loss.backward()
        return loss

    def batch(self):
        rng = np.random.default_rng(1)
        x = fs.asarray(rng.standard_normal((MICRO * 128, self.width)).astype(np.float32))
        y = fs.asarray(rng.standard_normal((MICRO * 128, 4)).astype(np.float32))
        return x.to_global(self.p0, B), y.to_global(self.p1, B)


def _overlaps(timeline) -> set[tuple[int, int]]:
    """(i + 1, i) for every time stage 0 worked on micro-batch i + 1 while stage 1 computed i."""
    s0 = [f for f in timeline if f.rank == 0 and f.phase != "optimizer"]
    s1 = [f for f in timeline if f.rank == 1 and f.phase != "optimizer" and f.kind == "compute"]
    return {(a.piece, b.piece) for a in s0 for b in s1
            if a.piece == b.piece + 1 and a.start < b.end and b.start < a.end}


def test_two_registers_let_stage_0_run_ahead_of_stage_1():
    step = _TwoStages(registers=2)
    x, y = step.batch()
    seen = set()
    for _ in range(4):  # timing-based: look over a few steps
        step(x, y)
        assert {f.piece for f in step.timeline if f.phase != "optimizer"} - {runtime.PER_STEP_PIECE} == set(range(MICRO))
        seen |= _overlaps(step.timeline)
    assert seen, "stage 0 never worked on micro-batch i+1 while stage 1 worked on micro-batch i"


@pytest.mark.parametrize("registers", [1, 2, 3])
def test_held_registers_never_exceed_the_plan(registers, monkeypatch):
    most = {}
    real = runtime.RankRuntime._fire

    def watched(self, a):
        woken = real(self, a)
        for v, n in self.held.items():
            most[v] = max(most.get(v, 0), n)
        return woken

    monkeypatch.setattr(runtime.RankRuntime, "_fire", watched)
    step = _TwoStages(registers=registers)
    step(*step.batch())
    assert most and max(most.values()) <= registers
    if registers > 1:
        assert max(most.values()) == registers  # and the room is used


def test_register_counts_do_not_change_the_numbers():
    losses = {}
    for registers in (1, 3):
        step = _TwoStages(registers=registers)
        x, y = step.batch()
        losses[registers] = [float(step(x, y)) for _ in range(3)]
    ref = _TwoStages(registers=1)
    ref.config.executor = "global"
    x, y = ref.batch()
    expected = [float(ref(x, y)) for _ in range(3)]
    np.testing.assert_allclose(losses[1], expected, rtol=1e-5)
    np.testing.assert_allclose(losses[3], expected, rtol=1e-5)


def test_timeline_records_every_firing_with_bytes():
    step = _TwoStages(registers=2)
    step(*step.batch())
    sends = [f for f in step.timeline if f.kind == "send"]
    # activations forward and their gradients back, one message per micro-batch each way
    assert len(sends) == 2 * MICRO
    assert all(f.nbytes == 128 * D * 4 for f in sends)
    assert all(f.end >= f.start for f in step.timeline)
    assert {f.rank for f in step.timeline} == {0, 1}


# ------------------------------------------------------------------------------- backends
def _mlp_step(placement):
    fs.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2)).to_global(
        placement, {"0.*": S(0), "2.weight": S(1)})

    class Step(fs.Graph):
        def __init__(self):
            super().__init__()
            self.model = model
            self.add_optimizer(optim.AdamW(model.parameters(), lr=1e-2))

        def build(self, x, y):
            loss = ((self.model(x) - y) ** 2).mean()
            loss.backward()
            return loss

    rng = np.random.default_rng(0)
    x = fs.asarray(rng.standard_normal((6, 8)).astype(np.float32)).to_global(placement, B)
    y = fs.asarray(rng.standard_normal((6, 2)).astype(np.float32)).to_global(placement, B)
    return Step(), x, y


def test_fs_init_local_runs_graphs_as_per_rank_actors():
    placement = fs.placement("cpu", [0, 1, 2])
    ref, x, y = _mlp_step(placement)
    expected = [float(ref(x, y)) for _ in range(3)]
    backend = fs.init(backend="local", timeout=5.0)
    step, x, y = _mlp_step(placement)
    got = [float(step(x, y)) for _ in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert set(backend.workers) == {0, 1, 2}
    assert step.timeline == []  # recorded only when asked


def test_fs_init_rejects_unknown_backends():
    with pytest.raises(fs.ConfigError, match="backend must be 'local' or 'ray'"):
        fs.init(backend="mpi")
    with pytest.raises(fs.ConfigError, match="timeout"):
        fs.init(backend="local", timeout=0)


def test_a_collective_some_ranks_never_join_names_them(monkeypatch):
    placement = fs.placement("cpu", [0, 1, 2])
    fs.init(backend="local", timeout=0.5)
    step, x, y = _mlp_step(placement)
    real = runtime.RankRuntime._fire

    def slow(self, a):
        if self.rp.rank == 2 and a.op.kind == "collective":
            time.sleep(3.0)  # never arrives in time
        return real(self, a)

    monkeypatch.setattr(runtime.RankRuntime, "_fire", slow)
    start = time.monotonic()
    with pytest.raises(backends.RankFailed, match=r"ranks \[2\] never joined the \w+ over ranks \[0, 1, 2\]"):
        step(x, y)
    assert time.monotonic() - start < 3.0  # reported from the stall, not after rank 2 wakes up


def test_the_backend_recovers_after_a_failed_step(monkeypatch):
    placement = fs.placement("cpu", [0, 1])
    fs.init(backend="local", timeout=2.0)
    step, x, y = _mlp_step(placement)
    real = runtime.RankRuntime._fire
    calls = {"n": 0}

    def flaky(self, a):
        if self.rp.rank == 0 and calls["n"] == 0:
            calls["n"] += 1
            raise MemoryError("out of memory")
        return real(self, a)

    monkeypatch.setattr(runtime.RankRuntime, "_fire", flaky)
    with pytest.raises(backends.RankFailed, match="rank 0 failed while running .*MemoryError: out of memory"):
        step(x, y)
    assert np.isfinite(float(step(x, y)))


# ------------------------------------------------------------------------------ wire format
@pytest.mark.parametrize("array", [np.arange(6, dtype=np.float32).reshape(2, 3), np.float64(2.5) * np.ones(()),
                                   np.array([True, False]), np.arange(12, dtype=np.int64).reshape(3, 4).T],
                         ids=["f32", "0-d", "bool", "non-contiguous"])
def test_tensor_messages_round_trip(array):
    back = decode(plan_pb2.Tensor.FromString(encode(7, array).SerializeToString()))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # writable, and not the sender's memory


@pytest.mark.parametrize("message, match", [
    (plan_pb2.Tensor(id=1, dtype="<f4", shape=[3], data=b"\0" * 8), "8 bytes do not make"),
    (plan_pb2.Tensor(id=1, dtype="|O", shape=[1], data=b"\0" * 8), "Python objects"),
    (plan_pb2.Tensor(id=1, dtype="float99", shape=[1], data=b""), "unknown dtype"),
    (plan_pb2.Tensor(id=1, dtype="<f4", shape=[-1], data=b""), "do not make"),
])
def test_malformed_tensor_messages_are_rejected(message, match):
    with pytest.raises(WireError, match=match):
        decode(message)


def test_a_worker_reports_a_bad_request_instead_of_dying():
    from actors.worker import Worker
    from comm import InProcessHub

    w = Worker(0, InProcessHub(2).communicator(0))
    try:
        resp = plan_pb2.StepResponse.FromString(w.step(b"\xff\xff not a protobuf"))
        assert resp.error_type and resp.error
        resp = plan_pb2.StepResponse.FromString(w.step(plan_pb2.StepRequest(plan="nope").SerializeToString()))
        assert resp.error_type == "KeyError" and "no plan 'nope'" in resp.error
    finally:
        w.close()


def test_parameters_stay_in_workers_and_user_changes_reach_them():
    placement = fs.placement("cpu", [0, 1, 2])
    fs.init(backend="local", timeout=5.0)
    step, x, y = _mlp_step(placement)
    ref, _, _ = _mlp_step(placement)
    ref.config.executor = "global"
    fresh = {k: v.numpy() for k, v in _mlp_step(placement)[0].model.state_dict().items()}
    got, expected = [], []
    for i in range(4):
        if i == 2:  # the user replaces the parameters between steps
            step.model.load_state_dict(fresh)
            ref.model.load_state_dict(fresh)
        got.append(float(step(x, y)))
        expected.append(float(ref(x, y)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    backend = fs.runtime.current()
    # the newest values are in the workers, and the last step sent none of them
    assert {id(p) for p in step.model.parameters()} == {id(ref()) for ref in backend.home.params.values()}
    assert all(sent < 2048 for sent, _ in step.traffic.values()), step.traffic


def test_optimizer_state_lost_with_restarted_workers_is_an_error_not_a_silent_reset(monkeypatch):
    placement = fs.placement("cpu", [0, 1])
    fs.init(backend="local", timeout=2.0)
    step, x, y = _mlp_step(placement)
    step(x, y)  # AdamW's moments now live in the workers
    real = runtime.RankRuntime._fire

    def dies(self, a):
        raise MemoryError("out of memory")

    monkeypatch.setattr(runtime.RankRuntime, "_fire", dies)
    with pytest.raises(backends.RankFailed):
        step(x, y)
    monkeypatch.setattr(runtime.RankRuntime, "_fire", real)
    with pytest.raises(fs.GraphError, match="restarted after a failure; load a checkpoint"):
        step(x, y)
