"""``flowsys launch``: run a training script, or a ``flowsys`` command, as the driver of a Ray cluster.

    flowsys launch [--nodes N] [--devices-per-node K] [--device cpu|cuda] [--address ADDR] [--max-restarts R]
                   [--profile TRACE.json] (train.py [args] | -- flowsys train JOB.yaml [overrides])

Without ``--address`` it starts a local Ray cluster that simulates ``N`` nodes (default 1) on
this machine (one Ray node each, ``K`` devices per node), runs the driver, and tears the cluster
down, also after Ctrl-C. With one, it first checks that something answers there (within
seconds, naming the address) and that the cluster has the nodes and devices asked for. The
driver runs in a process (and process group) of its own with ``FLOWSYS_BACKEND=ray`` and the cluster's address in
``FLOWSYS_ADDRESS`` and ``RAY_ADDRESS``: ``fs.init()`` and graphs that never call it run on
the cluster, and ``ray.init()`` joins it. The exit code is the script's. With ``--profile``,
every compiled step the script runs is recorded (``fs.profile``) and one Chrome/Perfetto trace
of all ranks is written when it exits.

Every simulated node offers ``K`` units of the custom resource ``flowsys_device``; workers
take one each, so at most ``K`` land on a node. A real cluster declares the same resource on
its worker nodes (see ``cluster_configs/``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from flowsys.errors import ConfigError

DEVICE_RESOURCE = "flowsys_device"


@dataclass(frozen=True)
class LaunchConfig:
    nodes: int
    devices_per_node: int = 1
    device: str = "cpu"
    address: str | None = None
    max_restarts: int = 0
    object_store_mib: int = 100
    profile: str | None = None

    def check(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"launch: --nodes must be at least 1, got {self.nodes}")
        if self.devices_per_node < 1:
            raise ConfigError(f"launch: --devices-per-node must be at least 1, got {self.devices_per_node}")
        if self.max_restarts < 0:
            raise ConfigError(f"launch: --max-restarts must be >= 0, got {self.max_restarts}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"launch: --device must be cpu or cuda, got {self.device!r}")


def launch(cfg: LaunchConfig, script: str, args: list[str]) -> int:
    """Run ``script`` with ``args`` as the driver of the cluster ``cfg`` describes; its exit code.
    ``script`` is a Python file, or ``flowsys`` (``flowsys launch -- flowsys train JOB.yaml``)."""
    cfg.check()
    command = driver_command(script, args)
    # Ray's authentication settings (RAY_AUTH_MODE, RAY_AUTH_TOKEN) are the user's: kept as they are
    cluster = None
    try:
        if cfg.address is None:
            cluster, address = _local_cluster(cfg)
        else:
            address = cfg.address
            probe_address(address)
            _check_cluster(cfg, address)
        env = {**os.environ, "FLOWSYS_BACKEND": "ray", "FLOWSYS_ADDRESS": address, "RAY_ADDRESS": address,
               "FLOWSYS_NODES": str(cfg.nodes), "FLOWSYS_DEVICES_PER_NODE": str(cfg.devices_per_node),
               "FLOWSYS_DEVICE": cfg.device, "FLOWSYS_MAX_RESTARTS": str(cfg.max_restarts)}
        if cfg.profile:
            env["FLOWSYS_PROFILE"] = os.path.abspath(cfg.profile)
        return _run_forwarding_signals(command, env)
    finally:
        if cluster is not None:
            import ray  # noqa: PLC0415

            ray.shutdown()
            cluster.shutdown()


def driver_command(script: str, args: list[str]) -> list[str]:
    """The driver's command line: a Python file run by this interpreter, or a ``flowsys``
    command run as ``python -m flowsys.cli`` (the same flowsys as the launcher's)."""
    if script == "flowsys":
        if not args:
            raise ConfigError("launch: `-- flowsys` needs a command, e.g. -- flowsys train JOB.yaml")
        return [sys.executable, "-m", "flowsys.cli", *args]
    if not os.path.isfile(script):
        raise ConfigError(f"launch: no script {script!r}; give a Python file, or -- flowsys train JOB.yaml")
    return [sys.executable, script, *args]


def probe_address(address: str, timeout: float = 10.0) -> None:
    """Something accepts connections at the Ray address ``address`` (``host:port``, the GCS;
    ``ray://host:port``, the client server), or a ConfigError names it within ``timeout``
    seconds: Ray itself retries an unreachable address for many minutes."""
    if address == "auto":
        return  # Ray finds the cluster started on this machine
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"launch: --address {address!r} is not host:port (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ConfigError(f"launch: no Ray cluster answers at {address} ({reason}); start one there "
                          f"(`ray start --head --port {port}`) or give the head node's address") from None


def _local_cluster(cfg: LaunchConfig):
    """``cfg.nodes`` Ray nodes on this machine, the CPUs shared out between them."""
    import ray  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    cpus = max(1, (os.cpu_count() or 1) // cfg.nodes)
    node = dict(num_cpus=cpus, resources={DEVICE_RESOURCE: cfg.devices_per_node},
                object_store_memory=cfg.object_store_mib * 2**20)
    if cfg.device == "cuda":
        node["num_gpus"] = cfg.devices_per_node
    print(f"flowsys launch: starting a local Ray cluster of {cfg.nodes} node(s), "
          f"{cfg.devices_per_node} {cfg.device} device(s) each", file=sys.stderr, flush=True)
    start = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    try:
        for _ in range(cfg.nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    except BaseException:
        cluster.shutdown()
        raise
    print(f"flowsys launch: cluster up at {cluster.address} in {time.monotonic() - start:.1f} s",
          file=sys.stderr, flush=True)
    return cluster, cluster.address


def _run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run the driver; SIGTERM and SIGINT sent to the launcher go on to it (a preempted job's
    driver saves a checkpoint after its current step), then the launcher waits for it to exit."""
    import signal  # noqa: PLC0415

    # a process group of its own: a terminal's Ctrl-C reaches the launcher, which passes it on
    # once (not twice), and tears the cluster down when the driver has stopped
    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    previous = {}

    def forward(signum, frame) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: no forwarding
            pass
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.kill()


@contextlib.contextmanager
def _stderr_aside():
    """File descriptor 2 (native code's logging too) into a temporary file meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as aside:
        os.dup2(aside.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _check_cluster(cfg: LaunchConfig, address: str) -> None:
    """The cluster at ``address`` has the nodes and devices asked for, or a ConfigError says
    what it has."""
    import ray  # noqa: PLC0415

    try:
        with _stderr_aside():  # Ray's native client logs a warning a second while it retries
            ray.init(address=address, log_to_driver=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"launch: cannot join the Ray cluster at {address!r}: {type(e).__name__}: {e}") from None
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        key = "GPU" if cfg.device == "cuda" else DEVICE_RESOURCE
        declared = any(key in n.get("Resources", {}) for n in alive)
        # a CPU cluster that declares no device resource: every live node can host workers
        per_node = [int(n.get("Resources", {}).get(key, 0)) if declared or key == "GPU" else cfg.devices_per_node
                    for n in alive]
        fit = [k for k in per_node if k >= cfg.devices_per_node]
        if len(fit) < cfg.nodes:
            raise ConfigError(
                f"launch: the cluster at {address} has {len(alive)} node(s) with {per_node} {key} each; "
                f"asked for {cfg.nodes} node(s) with {cfg.devices_per_node} each. Start more workers, or declare "
                f"resources={{'{DEVICE_RESOURCE}': K}} on them (cluster_configs/ does)")
    finally:
        ray.shutdown()



# ---------------------------------------------------------------- the processes a launch started
def descendants(root: int) -> list[int]:
    """The processes below ``root`` (children, their children, ...), in pid order (Linux
    ``/proc``): what a launch started, for tools and tests that stop only their own processes."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            out.append(pid)
            todo.append(pid)
    return sorted(out)


def cmdline(pid: int) -> str:
    """The command line of process ``pid`` ("" when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
