"""Names the driver gives its objects (parameters, optimizers) that the workers key what they
keep by: a number per object that is never reused while it lives, as ``id`` may be."""

from __future__ import annotations

import itertools
import weakref

_UIDS: dict[int, int] = {}
_NEXT_UID = itertools.count()


def uid(obj) -> int:
    """A number for ``obj`` that is never reused (ids are), forgotten when ``obj`` dies."""
    key = id(obj)
    if key not in _UIDS:
        _UIDS[key] = next(_NEXT_UID)
        weakref.finalize(obj, _UIDS.pop, key, None)
    return _UIDS[key]
