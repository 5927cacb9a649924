"""``fs.init(backend=...)``: where compiled graphs run.

- without ``fs.init`` (or with ``executor="global"`` in a graph's config), the driver runs the
  global graph itself over the shards it holds: the single-controller simulation;
- ``fs.init(backend="local")``: every rank's plan runs as register-based actors in a worker
  thread of this process, over the in-process transport;
- ``fs.init(backend="ray", address=None)``: every rank's plan runs in a Ray actor of its own
  (one per device, spread over the nodes), over gRPC.

``flowsys launch`` calls ``fs.init(backend="ray", address=...)`` for the script it runs.

>>> import flowsys as fs
>>> fs.init(backend="local").name
'local'
>>> fs.shutdown()
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

from flowsys.errors import ConfigError

_backend = None


def init(backend: str | None = None, *, address: str | None = None, timeout: float = 30.0, **ray_kwargs: Any):
    """Choose the backend compiled graphs run on; returns it. ``timeout`` (seconds) bounds how
    long a rank waits for a peer before the step fails naming it. ``backend`` defaults to the
    ``FLOWSYS_BACKEND`` environment variable (set by ``flowsys launch``), else ``"local"``."""
    global _backend
    backend = backend or os.environ.get("FLOWSYS_BACKEND", "local")
    address = address or os.environ.get("FLOWSYS_ADDRESS") or None
    if timeout <= 0:
        raise ConfigError(f"fs.init: timeout must be positive seconds, got {timeout}")
    shutdown()
    if backend == "local":
        if ray_kwargs or address:
            raise ConfigError("fs.init(backend='local') takes no address or Ray options")
        from actors.backends import LocalBackend  # noqa: PLC0415

        _backend = LocalBackend(timeout=timeout)
    elif backend == "ray":
        from actors.backends import RayBackend  # noqa: PLC0415

        _backend = RayBackend(address=address, timeout=timeout, **ray_kwargs)
    else:
        raise ConfigError(f"fs.init: backend must be 'local' or 'ray', got {backend!r}")
    global _exit_hook
    if not _exit_hook:  # a script that never calls fs.shutdown() still exits cleanly
        try:  # before the interpreter joins thread pools (the transport's servers), unlike atexit
            threading._register_atexit(shutdown)
        except (AttributeError, RuntimeError):
            atexit.register(shutdown)
        _exit_hook = True
    return _backend


def shutdown() -> None:
    """Stop the backend's workers (a Ray cluster this process joined stays up)."""
    global _backend
    if _backend is not None:
        _backend.shutdown()
    _backend = None


def current():
    """The backend ``fs.init`` chose, or None (the driver runs graphs itself). Under
    ``flowsys launch`` (``FLOWSYS_BACKEND=ray``) the first call joins the launched cluster."""
    if _backend is None and os.environ.get("FLOWSYS_BACKEND") == "ray":
        return init()
    return _backend


def local_backend():
    """The backend for a graph configured with ``executor="plans"`` when none was chosen."""
    global _default_local
    if _default_local is None:
        from actors.backends import LocalBackend  # noqa: PLC0415

        _default_local = LocalBackend()
    return _default_local


_default_local = None
_exit_hook = False
