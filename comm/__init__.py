"""Transport and collectives: one narrow interface with interchangeable implementations.

``Communicator`` is the interface (``send``, ``recv``, ``all_reduce``, ``all_gather``,
``reduce_scatter``, ``all_to_all``, ``broadcast``, ``barrier``); the collective algorithms are
written once in :mod:`comm.algorithms` as per-rank message schedules; :mod:`comm.inprocess`
carries them inside one process (lock-step simulation, or one thread per rank).

This package imports nothing else of flowsys.
"""

from comm.base import CommError, Communicator, Mailbox
from comm.inprocess import InProcessCommunicator, InProcessHub, drive, run_group

__all__ = ["Communicator", "CommError", "Mailbox", "InProcessHub", "InProcessCommunicator", "run_group", "drive"]
