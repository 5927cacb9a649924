"""Human-readable reports of a compiled graph: ``explain()`` and ``to_dot()``."""

from __future__ import annotations

from collections import defaultdict

from flowsys.graph.ir import Graph
from flowsys.ops.fusion import describe
from flowsys.layout import fmt


def _layout(v) -> str:
    return fmt(v.sbp) if v.sbp is not None else "local"


def boxing_nodes(g: Graph) -> list:
    return [n for n in g.nodes if n.kind == "boxing"]


def explain(g: Graph) -> str:
    """Every op with its SBPs, every boxing node with the collective(s) it lowers to and the
    bytes it moves per step (micro-batch nodes count once per micro-batch), and totals."""
    lines = [f"graph: {sum(n.kind == 'op' for n in g.nodes)} ops, {len(boxing_nodes(g))} boxing nodes, "
             f"{sum(n.kind == 'update' for n in g.nodes)} updates, {g.micro_batches} micro-batch(es) per step"]
    if g.precision != "fp32":
        lines.append(f"precision {g.precision}: parameters cast once per step, matmuls and their activations in "
                     f"{g.precision}, losses in float32; the updates step float32 master weights and state"
                     + ("; the loss is scaled (fp16)" if g.loss_scale is not None else ""))
    lines.append(f"{'node':>6}  {'phase':9} {'op':30} {'inputs':40} -> outputs")
    total = 0
    per_kind = defaultdict(int)
    for n in g.nodes:
        ins = ", ".join(f"{g.values[i].dtype.name}{list(g.values[i].shape)} {_layout(g.values[i])}" for i in n.inputs)
        outs = ", ".join(f"{g.values[o].dtype.name} {_layout(g.values[o])}" for o in n.outputs)
        if n.kind == "boxing":
            plan = n.attr.get("plan")
            times = g.micro_batches if n.phase != "optimizer" else 1
            nbytes = plan.nbytes * times if plan is not None else 0
            total += nbytes
            for s in plan.steps if plan is not None else ():
                per_kind[s.kind] += s.nbytes * times
            lines.append(f"{n.id:>6}  {n.phase:9} BOXING {n.op:23} {ins:40} -> {outs}   {nbytes} bytes/step")
        elif n.kind == "update":
            var = g.values[n.inputs[0]]
            state = ", ".join(n.attr.get("state", ()))
            lines.append(f"{n.id:>6}  {n.phase:9} {'update ' + n.op:30} {n.attr['variable']}: master "
                         f"{var.dtype.name}{list(var.shape)} {_layout(var)}, grad {g.values[n.inputs[1]].dtype.name}"
                         + (f", state {state} in {var.dtype.name}" if state else ""))
        elif n.op in ("fused_elementwise", "fused_rows"):
            parts = describe(n.attr["program"])
            lines.append(f"{n.id:>6}  {n.phase:9} {'FUSED ' + parts:30} {ins:40} -> {outs}   one generated kernel")
        else:
            lines.append(f"{n.id:>6}  {n.phase:9} {n.op:30} {ins:40} -> {outs}")
    fused = [n for n in g.nodes if n.op in ("fused_elementwise", "fused_rows")]
    if fused:
        lines.append(f"fused kernels: {len(fused)}, replacing {sum(len(n.attr['program']) for n in fused)} ops: "
                     + "; ".join(describe(n.attr["program"]) for n in fused))
    lines.append(f"boxing total: {total} bytes per step" + "".join(f"; {k} {v}" for k, v in sorted(per_kind.items())))
    placements = {v.placement for v in g.values.values() if v.placement is not None}
    for p in placements:
        lines.append(f"per rank on {p!r}: {total / p.size:.0f} bytes per step on average")
    return "\n".join(lines)


def memory_table(plan) -> str:
    """Per-rank memory from the plan: parameters, gradients, optimizer state, peak activations."""

    def mib(n: int) -> str:
        return f"{n / 2**20:10.3f}"

    lines = [f"memory per rank (MiB): {'rank':>5} {'params':>10} {'grads':>10} {'optimizer':>10} "
             f"{'activations':>11} {'total':>10}"]
    for rp in plan.ranks:
        m = rp.memory
        total = m.parameters + m.gradients + m.optimizer_state + m.peak_activations
        lines.append(f"{'':22}{rp.rank:>5} {mib(m.parameters)} {mib(m.gradients)} {mib(m.optimizer_state)} "
                     f"{mib(m.peak_activations):>11} {mib(total)}")
    return "\n".join(lines)


def to_dot(g: Graph) -> str:
    """A Graphviz graph: ops as boxes, boxing nodes highlighted, SBPs on the edges."""
    out = ["digraph flowsys {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    producer = g.producer()
    for n in g.nodes:
        style = ', style=filled, fillcolor="#ffd27f"' if n.kind == "boxing" else ""
        out.append(f'  n{n.id} [label="{n.op}"{style}];')
        for i in n.inputs:
            v = g.values[i]
            src = f"n{producer[i].id}" if i in producer else f"v{i}"
            if i not in producer:
                out.append(f'  v{i} [shape=ellipse, label="{v.dtype.name}{list(v.shape)}"];')
            out.append(f'  {src} -> n{n.id} [label="{_layout(v)}"];')
    out.append("}")
    return "\n".join(out)
