"""Grad mode: whether eager ops record themselves on the tape.

>>> import flowsys as fs
>>> x = fs.ones((2,), requires_grad=True)
>>> with fs.no_grad():
...     y = x * 2
>>> y.requires_grad
False
"""

from __future__ import annotations

import contextlib
import functools
import threading

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "enabled", True)


def set_grad_enabled(mode: bool) -> None:
    _state.enabled = bool(mode)


class _GradMode(contextlib.ContextDecorator):
    def __init__(self, mode: bool):
        self.mode = mode

    def __enter__(self):
        self.prev = is_grad_enabled()
        set_grad_enabled(self.mode)
        return self

    def __exit__(self, *exc):
        set_grad_enabled(self.prev)
        return False

    def __call__(self, fn):
        # A fresh context per call, so the decorated function is reentrant and thread safe.
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with _GradMode(self.mode):
                return fn(*args, **kwargs)

        return wrapper


def no_grad() -> _GradMode:
    """Context manager / decorator: ops inside record nothing and give tensors without grad."""
    return _GradMode(False)


def enable_grad() -> _GradMode:
    return _GradMode(True)
