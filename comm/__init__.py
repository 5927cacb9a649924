"""Transport and collectives: one narrow interface with interchangeable implementations.

``Communicator`` is the interface (``send``, ``recv``, ``all_reduce``, ``all_gather``,
``reduce_scatter``, ``all_to_all``, ``broadcast``, ``barrier``); the collective algorithms are
written once in :mod:`comm.algorithms` as per-rank message schedules; :mod:`comm.inprocess`
carries them inside one process (lock-step simulation, or one thread per rank);
:mod:`comm.grpc_transport` carries them between processes and hosts (``GrpcCommunicator``: gRPC
streams, shared memory between ranks on one host; wire format in ``comm/wire.proto``);
:mod:`comm.nccl` carries arrays between CUDA devices with NCCL's own collectives
(``NcclCommunicator``, one process per GPU; CuPy is optional and imported only when one is built:
``nccl_available()`` says whether it can run here).

This package imports nothing else of flowsys.
"""

from comm.base import CommError, Communicator, Mailbox
from comm.grpc_transport import GrpcCommunicator
from comm.inprocess import InProcessCommunicator, InProcessHub, drive, run_group
from comm.nccl import NcclCommunicator, nccl_unique_id
from comm.nccl import available as nccl_available

__all__ = ["Communicator", "CommError", "Mailbox", "InProcessHub", "InProcessCommunicator", "GrpcCommunicator",
           "NcclCommunicator", "nccl_unique_id", "nccl_available", "run_group", "drive"]
