"""``fs.profile()``: record every actor firing of the compiled steps run inside it, on every
rank, and write them as one Chrome / Perfetto trace.

>>> import flowsys as fs
>>> with fs.profile("trace.json") as prof:          # doctest: +SKIP
...     for _ in range(3):
...         loss = step(idx, targets)
>>> prof.summary()                                   # doctest: +SKIP

A trace has one process per rank (``rank N``) and, inside it, one thread per actor (the plan
op: ``matmul #12``, ``all_reduce #40``), so communication and compute sit on the tracks of the
rank that ran them. Every event carries its step, micro-batch, phase, bytes sent and the graph
node it lowers from; inserted boxing ops are named after their node, so the communication
events of a trace can be matched with ``Graph.explain()`` node by node. Open the file in
https://ui.perfetto.dev or chrome://tracing.

Graphs run as per-rank actor plans while profiling (``executor="auto"`` without ``fs.init``
picks the local backend), since the single-controller simulation has no actors to record.
``flowsys launch --profile PATH`` profiles a whole script: the trace is written when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
from collections import defaultdict
from typing import Any

_active: list[Profile] = []


class Profile:
    """The firings recorded while active: ``steps`` holds one list of firings per compiled
    step run (each firing has rank, op, name, kind, phase, piece, start, end, nbytes, node)."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.steps: list[list] = []
        self.graphs: list[str] = []      # the graph class that ran each step
        self.boxing: dict[int, str] = {}  # boxing node id -> its op, from the graphs' IR

    def __enter__(self) -> Profile:
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        if self.path is not None:
            self.save(self.path)

    def add(self, graph: str, timeline, boxing: dict[int, str]) -> None:
        self.steps.append(timeline)  # read (and decoded) when the profile is looked at
        self.graphs.append(graph)
        self.boxing.update(boxing)

    @property
    def firings(self) -> list:
        return [f for step in self.steps for f in step]

    def trace(self) -> dict[str, Any]:
        """The Chrome trace-event JSON object (``ph: X`` complete events, times in µs)."""
        from actors.runtime import OPTIMIZER_PIECE, PER_STEP_PIECE  # noqa: PLC0415

        firings = self.firings
        t0 = min((f.start for f in firings), default=0.0)
        events: list[dict[str, Any]] = []
        tracks: dict[tuple[int, int], str] = {}
        for step, fired in enumerate(self.steps):
            for f in fired:
                name = f"{f.name} (boxing {self.boxing[f.node]})" if f.node in self.boxing else f.name
                tracks.setdefault((f.rank, f.op), f"{name} #{f.op}")
                piece = None if f.piece in (OPTIMIZER_PIECE, PER_STEP_PIECE) else f.piece
                events.append({"name": name, "cat": f.kind, "ph": "X", "pid": f.rank, "tid": f.op,
                               "ts": round((f.start - t0) * 1e6, 3), "dur": round(max(f.end - f.start, 0.0) * 1e6, 3),
                               "args": {"step": step, "graph": self.graphs[step], "micro_batch": piece,
                                        "phase": f.phase, "bytes": f.nbytes, "node": f.node,
                                        "boxing": f.node in self.boxing}})
        meta: list[dict[str, Any]] = []
        for rank in sorted({r for r, _ in tracks}):
            meta.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
            meta.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for (rank, op), label in sorted(tracks.items()):
            meta.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": op, "args": {"name": label}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": rank, "tid": op, "args": {"sort_index": op}})
        return {"traceEvents": meta + events, "displayTimeUnit": "ms",
                "otherData": {"producer": "flowsys", "steps": len(self.steps), "epoch_start_s": t0}}

    def save(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.trace(), f)
        return path

    def summary(self) -> str:
        """Per rank: busy seconds by kind of actor and bytes sent, over all recorded steps."""
        busy: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        sent: dict[int, int] = defaultdict(int)
        for f in self.firings:
            busy[f.rank][f.kind] += f.end - f.start
            sent[f.rank] += f.nbytes
        kinds = sorted({k for b in busy.values() for k in b})
        lines = [f"{len(self.steps)} step(s) recorded; seconds busy per rank by actor kind",
                 f"{'rank':>5} " + " ".join(f"{k:>11}" for k in kinds) + f" {'bytes sent':>12}"]
        for rank in sorted(busy):
            lines.append(f"{rank:>5} " + " ".join(f"{busy[rank][k]:11.4f}" for k in kinds) + f" {sent[rank]:>12}")
        return "\n".join(lines)


def profile(path: str | os.PathLike | None = None) -> Profile:
    """A context manager recording the actor firings of every compiled step run inside it;
    with ``path``, the Chrome trace is written there on exit."""
    return Profile(path)


def active() -> Profile | None:
    return _active[-1] if _active else None


def _from_environment() -> None:
    """``flowsys launch --profile PATH`` sets ``FLOWSYS_PROFILE``: profile the whole script and
    write the trace when it exits."""
    path = os.environ.get("FLOWSYS_PROFILE")
    if not path or _active:
        return
    prof = Profile(path)
    _active.append(prof)

    def write() -> None:
        if prof.steps:
            prof.save(path)
            print(f"flowsys: wrote a trace of {len(prof.steps)} step(s) to {path}", flush=True)
        else:
            print(f"flowsys: --profile: no compiled step ran, so no trace was written to {path}", flush=True)

    atexit.register(write)
