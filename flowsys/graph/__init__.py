"""Graph mode: tracing ``build()`` into one global IR, the compiler passes, and running it.

The user-facing class is :class:`flowsys.Graph` (``flowsys.graph.api``); this package's
modules are the IR (``ir``), the tracer (``trace``), the passes (``passes``) and the executor
(``run``). It imports nothing at package level so that ``flowsys.tensor`` can use the tracer.
"""
