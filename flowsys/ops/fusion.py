"""The fused elementwise op: a chain of elementwise ops run as one kernel generated from their
scalar rules (``flowsys.ops.scalar``), made by the fusion pass (``flowsys.graph.fuse``).

Its ``program`` attribute lists the parts in order, each ``(op, args, attrs)``: ``args`` name the
fused op's inputs (``("in", k)``) or earlier parts' results (``("t", j)``); the last part's result
is the output. One program, three ways to run it:

- **generated for the CPU**: a Numba kernel whose source is written from the parts' rules, one
  line per part, into a file under :func:`kernel_dir` (so Numba's disk cache keeps the compiled
  code between processes), run over the flattened arrays in parallel chunks (the threads of
  ``fused``'s pool, sharing the cores with BLAS). float32 computes exp and erf with ``fused``'s
  vectorisable polynomials, float64 with ``math`` and no fast-math (exact to rounding);
- **generated for CUDA**: a CuPy ``ElementwiseKernel`` from the same rules rendered as C;
- **the reference**: the parts' own kernels one after another (their xp expressions), which is
  what runs for other dtypes (float16, integers), broadcasting inputs, without Numba, or with
  ``FLOWSYS_JIT=0``, and what the generated kernels are tested against.

bfloat16 arrays reach the generated CPU kernels as their bits (uint16 views): each element is
loaded into float32 (``fused._bf16_load``), the program computes in float32, and the result is
rounded to nearest even once (``fused._bf16_store``), where the parts would round after each.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from flowsys.errors import ArgumentError
from flowsys.ops import fused
from flowsys.ops import sbp_rules as R
from flowsys.ops import scalar as sc
from flowsys.ops.registry import OPS, Cost, SbpRow, Spec, bfloat16, moved, register
from flowsys.sbp import PartialSum, broadcast

P, B = PartialSum(), broadcast
f32 = np.float32
_exp32, _erf32 = fused._exp, fused._erf


def _maximum(a, b):  # np.maximum's NaN rule: NaN if either is
    return a if (a != a or a >= b) else b


def _row_max(v, n):
    """The largest of ``v[:n]``, NaN if any is: one vectorised pass for the maximum (its function
    may assume no NaN), one for the NaN test."""
    if n == 0:
        return v.dtype.type(-np.inf)
    m = _max_no_nan(v, n)
    return m if _no_nan(v, n) else v.dtype.type(np.nan)


def _max_no_nan(v, n):
    # eight running maxima: independent chains the compiler keeps in one vector register (a single
    # chain is bound by the latency of each compare)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = v[0]
    k = n - n % 8
    for j in range(0, k, 8):
        a0 = v[j] if v[j] > a0 else a0
        a1 = v[j + 1] if v[j + 1] > a1 else a1
        a2 = v[j + 2] if v[j + 2] > a2 else a2
        a3 = v[j + 3] if v[j + 3] > a3 else a3
        a4 = v[j + 4] if v[j + 4] > a4 else a4
        a5 = v[j + 5] if v[j + 5] > a5 else a5
        a6 = v[j + 6] if v[j + 6] > a6 else a6
        a7 = v[j + 7] if v[j + 7] > a7 else a7
    a0 = a0 if a0 > a4 else a4
    a1 = a1 if a1 > a5 else a5
    a2 = a2 if a2 > a6 else a6
    a3 = a3 if a3 > a7 else a7
    a0 = a0 if a0 > a2 else a2
    a1 = a1 if a1 > a3 else a3
    m = a0 if a0 > a1 else a1
    for j in range(k, n):
        m = v[j] if v[j] > m else m
    return m


def _no_nan(v, n):
    bad = False
    for j in range(n):
        bad |= v[j] != v[j]
    return not bad


if fused.numba is not None:
    _maximum = fused._kernel(_maximum)
    _max_no_nan = fused.numba.njit(fastmath=fused._FLAGS | {"nnan"}, nogil=True, cache=True)(_max_no_nan)
    _no_nan = fused.numba.njit(nogil=True, cache=True)(_no_nan)
    _row_max = fused.numba.njit(nogil=True, cache=True)(_row_max)


def kernel_dir() -> Path:
    """Where generated kernel sources (and Numba's cache of them) live: ``FLOWSYS_KERNEL_CACHE``,
    else ``~/.cache/flowsys/kernels``."""
    return Path(os.environ.get("FLOWSYS_KERNEL_CACHE") or Path.home() / ".cache" / "flowsys" / "kernels")


# ---------------------------------------------------------------------------------- programs
def program_of(attrs_program) -> tuple:
    """The program as nested tuples (a plan's JSON gives lists)."""
    return tuple((op, tuple(tuple(a) for a in args), tuple(sorted(dict(at).items())))
                 for op, args, at in attrs_program)


def part_names(program) -> list[str]:
    return [op for op, _, _ in program_of(program)]


def _args(args, ins, temps):
    return [ins[k] if kind == "in" else temps[k] for kind, k in args]


def _each_part(xp, program, ins) -> list:
    """The reference: every part's own kernel in turn; each part's result."""
    temps: list = []
    for op, args, attrs in program_of(program):
        temps.append(OPS[op].kernel(xp, *_args(args, ins, temps), **dict(attrs)))
    return temps


def run_parts(xp, program, ins) -> Any:
    """The reference: every part's own kernel in turn; the last part's result."""
    return _each_part(xp, program, ins)[-1]


def _listed(values, outputs) -> list:
    """The listed parts' values in order, each of a part with several outputs (a tuple) in turn."""
    return [v for j in outputs for v in (values[j] if isinstance(values[j], tuple) else (values[j],))]


def _flat(ins) -> list:
    """The inputs as a generated kernel takes them: flat, contiguous (a 0-d one as one element),
    bfloat16 as its bits."""
    return [_bits(a.reshape(1) if a.ndim == 0 else np.ascontiguousarray(a).reshape(-1)) for a in ins]


def _walk(program, specs) -> list[tuple]:
    """Each part as (op, args, attrs, its arguments' specs, its output's spec), in order."""
    parts, temps = [], []
    for op, args, at in program_of(program):
        arg_specs = _args(args, specs, temps)
        temps.append(OPS[op].infer(*arg_specs, **dict(at)))
        parts.append((op, args, dict(at), arg_specs, temps[-1]))
    return parts


def _infer(*specs: Spec, program) -> Spec:
    return _walk(program, specs)[-1][4]


def _rows(specs, attrs) -> list[SbpRow]:
    """The signatures that follow from the parts': a candidate (a split axis on every input that
    has it, all replicated, or any mix of partial sums and replicated) is a row when every part,
    fed its arguments' SBPs in turn, has a row taking exactly those."""
    program = attrs["program"]
    parts = _walk(program, specs)
    candidates = [row.ins for row in R.pointwise(specs)]
    candidates += [c for c in itertools.product((P, B), repeat=len(specs)) if P in c]
    return _follow(parts, candidates, (len(parts) - 1,), f"follows from its parts ({describe(program)})")


def _follow(parts, candidates, outputs, why) -> list[SbpRow]:
    """Each candidate signature of the inputs that every part, fed its arguments' SBPs in turn,
    takes, as a row giving the listed parts' outputs' SBPs."""
    part_rows = [{tuple(r.ins): r.outs for r in reversed(OPS[op].sbp(arg_specs, at))}  # the first row wins
                 for op, _, at, arg_specs, _ in parts]
    rows = []
    for ins in candidates:
        temps = []
        for (_, args, _, _, _), table in zip(parts, part_rows):
            out = table.get(tuple(_args(args, ins, temps)))
            if out is None:
                break
            temps.append(out[0])
        else:
            rows.append(SbpRow(tuple(ins), tuple(temps[j] for j in outputs), why))
    return rows


def _cost(ins, outs, attrs) -> Cost:
    """The parts' FLOPs; the bytes of one pass: the inputs read once, the outputs written once
    (the parts' intermediates never reach memory)."""
    flops = sum(OPS[op].cost(arg_specs, list(out) if isinstance(out, tuple) else [out], at).flops
                for op, _, at, arg_specs, out in _walk(attrs["program"], ins) if OPS[op].cost is not None)
    return Cost(flops, moved(ins, outs))


# ------------------------------------------------------------------------------ the kernel
@register("fused_elementwise", infer=_infer, sbp=_rows, cost=_cost, low_precision="native")
def fused_elementwise(xp, *ins, program):
    """A chain of elementwise ops in one pass (see the module docstring)."""
    prog = program_of(program)
    if xp is np and generated_usable(prog, ins):
        return _run_numba(prog, ins)
    if xp is not np and _cuda_usable(xp, prog, ins):
        return _run_cuda(xp, prog, ins)
    return run_parts(xp, prog, ins)


def _shape_and_dtype(ins) -> tuple[tuple, np.dtype] | None:
    """The common shape and dtype of the inputs a generated kernel takes: the full ones share both,
    0-d ones (scalars) share the dtype; None when they do not."""
    full = [a for a in ins if a.ndim]
    if not full:
        return None
    shape, dtype = full[0].shape, full[0].dtype
    if any(a.shape != shape for a in full) or any(a.dtype != dtype for a in ins):
        return None
    return shape, dtype


GENERATED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(bfloat16))


def _compute(dtype) -> np.dtype:
    """What a generated kernel computes in for arrays of ``dtype``: bfloat16 in float32 (loaded
    from and stored to its bits, a uint16 view, rounding once at the end), the others as they are."""
    return np.dtype(np.float32) if np.dtype(dtype) == bfloat16 else np.dtype(dtype)


def _bits(a):
    """An array as the generated kernel takes it: bfloat16 as its bits."""
    return a.view(np.uint16) if a.dtype == bfloat16 else a


def _read(dtype, x: str) -> str:
    return f"_bf16_load({x})" if np.dtype(dtype) == bfloat16 else x


def _write(dtype, x: str) -> str:
    return f"_bf16_store({x})" if np.dtype(dtype) == bfloat16 else x


def _generable(program, ins, targets=GENERATED_DTYPES) -> bool:
    """Arrays of one shape (or 0-d) and one of ``targets``' dtypes, every part with a scalar rule:
    what a generated kernel takes (CUDA: float32 and float64)."""
    common = _shape_and_dtype(ins)
    return common is not None and common[1] in targets and all(OPS[op].scalar is not None for op, _, _ in program)


def generated_usable(program, ins) -> bool:
    """Whether the generated CPU kernel runs this program on ``ins``: Numba on, NumPy arrays
    :func:`_generable` takes."""
    return fused.ENABLED and all(type(a) is np.ndarray for a in ins) and _generable(program, ins)


def _cuda_usable(xp, program, ins) -> bool:
    """Whether CuPy runs the generated CUDA kernel (``xp`` is CuPy, the arrays its)."""
    return hasattr(xp, "ElementwiseKernel") and not any(isinstance(a, np.ndarray) for a in ins) and \
        _generable(program, ins, GENERATED_DTYPES[:2])


def _lines(program, names: list[str], target: str, dtype, declare: str = "",
           consts: dict | None = None) -> tuple[list[str], str]:
    """One assignment per part, from its scalar rule; the last part's name."""
    lines, temps = [], []
    for j, (op, args, at) in enumerate(program):
        arg_names = _args(args, names, temps)
        expr = sc.evaluate(OPS[op].scalar, len(args), dict(at))
        lines.append(f"{declare}t{j} = {sc.render(expr, arg_names, target, dtype, consts=consts)}")
        temps.append(f"t{j}")
    return lines, temps[-1]


def numba_source(program, scalars: tuple[bool, ...], dtype, consts: dict | None = None) -> str:
    """The generated Numba kernel's source: ``kernel(i0, ..., out, kc)`` over flat arrays (a 0-d
    input comes as a one-element array; ``kc`` holds the constants hoisted into ``consts``, see
    ``scalar.render``)."""
    storage, dtype = np.dtype(dtype), _compute(dtype)
    n = len(scalars)
    names = [f"x{k}" for k in range(n)]
    consts = {} if consts is None else consts
    body, last = _lines(program, names, "numba", dtype, consts=consts)
    flags = "fastmath=_FLAGS, " if dtype == np.float32 else ""
    ops = ", ".join(op for op, _, _ in program)
    return "\n".join([
        f'"""Generated by flowsys.ops.fusion ({storage.name}): {ops}."""',
        *_HEADER,
        f"@numba.njit({flags}nogil=True, error_model='numpy', cache=True)",
        f"def kernel({', '.join(f'i{k}' for k in range(n))}, out, kc, go):",
        "    _wide()",
        "    _release(go)",
        *_constants(consts),
        *[f"    x{k} = {_read(storage, f'i{k}[0]')}" for k in range(n) if scalars[k]],
        "    for i in range(out.size):",
        *[f"        x{k} = {_read(storage, f'i{k}[i]')}" for k in range(n) if not scalars[k]],
        *[f"        {line}" for line in body],
        f"        out[i] = {_write(storage, last)}",
        "",
    ])


def _helpers_digest() -> str:
    """A hash of the helpers generated kernels call: Numba's disk cache keeps a kernel compiled
    with the helpers it had, so a kernel's source (and with it its file and cache) names them."""
    import inspect  # noqa: PLC0415

    texts = []
    for f in (fused._exp, fused._erf, fused._bf16_load, fused._bf16_store, fused._release, fused._wide, _maximum,
              _row_max, _max_no_nan, _no_nan):
        f = getattr(f, "py_func", f)
        try:
            texts.append(inspect.getsource(f))
        except (OSError, TypeError):  # no source (a frozen install): the version stands for it
            texts.append(f.__qualname__)
    texts.append(repr(sorted(fused._FLAGS)))
    return hashlib.sha256("".join(texts).encode()).hexdigest()[:16]


_HEADER = ["import math", "import numpy as np", "import numba",
           "from flowsys.ops.fusion import _exp32, _erf32, _maximum, _row_max, f32",
           "from flowsys.ops.fused import _FLAGS, _bf16_load, _bf16_store, _release, _wide",
           f"# helpers {_helpers_digest()}", ""]


def _constants(consts: dict) -> list[str]:
    """The kernel's first lines: each hoisted constant read from ``kc``."""
    return [f"    {name} = kc[{i}]" for i, name in enumerate(consts.values())]


def _values(consts: dict, dtype) -> np.ndarray:
    """``kc``: the hoisted constants' values in the kernel's compute dtype (never empty: one array
    type per kernel)."""
    return np.array(list(consts) or [0.0], _compute(dtype))


_compiled: dict[tuple, Any] = {}
_compile_lock = threading.Lock()


def _compiled_for(key, source, dtype, kind: str = "fused") -> tuple:
    """(kernel, ``kc``) for ``key``: ``source(consts)`` rendered, loaded and kept, once per key."""
    got = _compiled.get(key)
    if got is None:
        consts: dict = {}
        src = source(consts)
        got = _compiled[key] = (_load(src, kind), _values(consts, dtype))
    return got


def numba_kernel(program, scalars: tuple[bool, ...], dtype):
    """(the compiled kernel, its constants) for this program, scalar pattern and dtype."""
    return _compiled_for((program, scalars, np.dtype(dtype).name),
                         lambda consts: numba_source(program, scalars, dtype, consts), dtype)


_loaded: dict[str, Any] = {}


def _load(src: str, kind: str = "fused"):
    """The ``kernel`` of generated source ``src``: written to :func:`kernel_dir` once, keyed by the
    source's hash, then imported (so Numba's disk cache finds it in the next process)."""
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    kern = _loaded.get(digest)
    if kern is not None:
        return kern
    with _compile_lock:
        kern = _loaded.get(digest)
        if kern is None:
            folder = kernel_dir()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{kind}_{digest}.py"
            if not path.exists() or path.read_text() != src:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(src)
                os.replace(tmp, path)  # another process writing the same source is harmless
            name = f"flowsys_{kind}_{digest}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # Numba's disk cache finds the kernel's module by name
            spec.loader.exec_module(module)
            kern = _loaded[digest] = module.kernel
    return kern


def _run_numba(program, ins):
    shape, dtype = _shape_and_dtype(ins)
    scalars = tuple(a.ndim == 0 for a in ins)
    kern, kc = numba_kernel(program, scalars, dtype)
    flat = _flat(ins)
    out = np.empty(shape, dtype)
    of = _bits(out.reshape(-1))
    fused._split_go(lambda lo, hi, go: kern(*(f if s else f[lo:hi] for f, s in zip(flat, scalars)), of[lo:hi], kc, go),
                    of.size)
    return out


def run_one(op: str, ins, **attrs):
    """Op ``op`` alone through its generated kernel (None where that kernel cannot take ``ins``:
    the caller runs its xp expression). A hand-written fused kernel is this, generated."""
    program = ((op, tuple(("in", k) for k in range(len(ins))), tuple(sorted(attrs.items()))),)
    return _run_numba(program, ins) if generated_usable(program, ins) else None


def rule_source(rule, scalars: tuple[bool, ...], n_out: int, dtype, alias: tuple = (),
                consts: dict | None = None) -> str:
    """The generated Numba kernel of a rule with several outputs (``rule(*inputs)`` returns one
    expression each): ``kernel(i0, ..., o0, ...)`` over flat arrays. Every input element is loaded
    before any output element is stored, so an output may be an input: ``alias[q] = k`` stores
    output q into input k itself (passed once: two names for one array would keep the compiler
    from vectorising the loop)."""
    storage, dtype = np.dtype(dtype), _compute(dtype)
    n = len(scalars)
    alias = alias or (None,) * n_out
    outs = [sc._e(e) for e in rule(*(sc.arg(k) for k in range(n)))]
    names = [f"x{k}" for k in range(n)]
    consts = {} if consts is None else consts
    bound: dict = {}
    lines = []
    for q in sorted(range(n_out), key=lambda q: not any(sc.holds(o, outs[q]) for o in outs if o is not outs[q])):
        lines.append(f"y{q} = {sc.render(outs[q], names, 'numba', dtype, bound, consts)}")
        bound[outs[q]] = f"y{q}"  # an output another one holds (AdamW's moments) is computed once
    flags = "fastmath=_FLAGS, " if dtype == np.float32 else ""
    first = "i" if alias[0] is not None else "o"
    return "\n".join([
        f'"""Generated by flowsys.ops.fusion ({storage.name}): {getattr(rule, "__name__", "rule")}, {n_out} outputs."""',
        *_HEADER,
        f"@numba.njit({flags}nogil=True, error_model='numpy', cache=True)",
        f"def kernel({', '.join([f'i{k}' for k in range(n)] + [f'o{q}' for q in range(n_out) if alias[q] is None])}, kc, go):",
        "    _wide()",
        "    _release(go)",
        *_constants(consts),
        *[f"    x{k} = {_read(storage, f'i{k}[0]')}" for k in range(n) if scalars[k]],
        f"    for i in range({first}{alias[0] if alias[0] is not None else 0}.size):",
        *[f"        x{k} = {_read(storage, f'i{k}[i]')}" for k in range(n) if not scalars[k]],
        *[f"        {line}" for line in lines],
        *[f"        {f'o{q}' if alias[q] is None else f'i{alias[q]}'}[i] = {_write(storage, f'y{q}')}"
          for q in range(n_out)],
        "",
    ])


def run_rule(rule, ins, out) -> bool:
    """``out[q][...] = rule(*ins)[q]`` through the rule's generated kernel: ``ins`` of one shape
    (or 0-d, e.g. a step's hyperparameters) and one dtype, ``out`` C-contiguous arrays of that
    shape and dtype, which may be among ``ins`` (updated in place). False (nothing done) where the
    kernel does not take them: the caller runs its xp expression."""
    if not fused.ENABLED or any(type(a) is not np.ndarray for a in (*ins, *out)):
        return False
    common = _shape_and_dtype(ins)
    if common is None or common[1] not in GENERATED_DTYPES or \
            any(o.shape != common[0] or o.dtype != common[1] or not o.flags.c_contiguous for o in out):
        return False
    scalars = tuple(a.ndim == 0 for a in ins)
    alias = tuple(next((k for k, a in enumerate(ins) if a is o), None) for o in out)
    if any(k is not None and not ins[k].flags.c_contiguous for k in alias):
        return False
    kern, kc = _compiled_for((rule, scalars, alias, common[1].str),
                             lambda consts: rule_source(rule, scalars, len(out), common[1], alias, consts),
                             common[1], "rule")
    flat = _flat(ins)
    flat_out = [_bits(o.reshape(-1)) for o, k in zip(out, alias) if k is None]
    fused._split_go(lambda lo, hi, go: kern(*(f if s else f[lo:hi] for f, s in zip(flat, scalars)),
                                            *(o[lo:hi] for o in flat_out), kc, go), out[0].size)
    return True


def cuda_source(program, n: int, dtype) -> tuple[str, str, str]:
    """(in_params, out_params, operation) of the CuPy ``ElementwiseKernel``."""
    body, last = _lines(program, [f"x{k}" for k in range(n)], "cuda", dtype, declare=f"{sc._ctype(dtype)} ")
    return ", ".join(f"T x{k}" for k in range(n)), "T out", "; ".join(body + [f"out = {last}"]) + ";"


_CUDA_PREAMBLE = """
template <typename T> __device__ T _maximum(T a, T b) { return (a != a || a >= b) ? a : b; }
"""
_cuda_kernels: dict[tuple, Any] = {}


def _run_cuda(cupy, program, ins):
    shape, dtype = _shape_and_dtype(ins)
    key = (program, len(ins), np.dtype(dtype).name)
    kern = _cuda_kernels.get(key)
    if kern is None:
        in_params, out_params, operation = cuda_source(program, len(ins), dtype)
        name = "flowsys_fused_" + hashlib.sha256(operation.encode()).hexdigest()[:12]
        kern = _cuda_kernels[key] = cupy.ElementwiseKernel(in_params, out_params, operation, name,
                                                           preamble=_CUDA_PREAMBLE)
    return kern(*ins)


def describe(program) -> str:
    """``add -> gelu``: the parts in order, for ``explain()`` and errors."""
    return " -> ".join(part_names(program))



# ---------------------------------------------------------------------------------- row programs
# A program with one part that reduces over rows (layer norm, softmax: an op with a row rule,
# ``OpDef.row``) fuses with the elementwise parts before it (computed again in each of the row's
# passes, from the inputs: the residual add before a layer norm) and after it. Intermediates that
# are needed outside (the residual sum itself) are outputs too: ``outputs`` lists the parts whose
# results the node returns, in order. The generated kernel makes one pass over each row per
# reduction, then one writing every output; the row is small enough to stay in L1 between them.

def _row_part(program) -> tuple[int, int]:
    """(index, trailing axes per row) of the program's row part."""
    for j, (op, _, at) in enumerate(program_of(program)):
        if OPS[op].row is not None:
            return j, OPS[op].row.axes(dict(at))
    raise ArgumentError(f"fused_rows: no part of {describe(program)} reduces over rows (has a row rule); "
                        f"a chain of elementwise ops is a fused_elementwise program")


def _rows_infer(*specs: Spec, program, outputs) -> tuple[Spec, ...]:
    return tuple(_listed([part[4] for part in _walk(program, specs)], outputs))


def _rows_shape(program, specs) -> tuple[tuple, int]:
    """(the rows' shape: the row part's first argument's, trailing axes per row)."""
    j_row, axes = _row_part(program)
    return tuple(_walk(program, specs)[j_row][3][0].shape), axes


def _input_kinds(program, specs, shape, axes) -> tuple[str, ...]:
    """Per input, how the kernel reads it: "full" (the rows' shape), "row" (one row's shape,
    broadcast to every row: layer norm's weight), "lead" (one value per row, where a row part
    declares it: cross entropy's targets), "scalar" (0-d), or "?" (none of these)."""
    lead = set()
    for op, args, _ in program_of(program):
        rule = OPS[op].row
        if rule is not None:
            lead.update(k for a, (kind, k) in enumerate(args) if kind == "in" and a in rule.lead)
    row = tuple(shape[len(shape) - axes:])
    kinds = []
    for k, s in enumerate(specs):
        s = tuple(s.shape)
        if k in lead:
            kinds.append("lead" if s == tuple(shape[:len(shape) - axes]) else "?")
        else:
            kinds.append("full" if s == tuple(shape) else "scalar" if not s else "row" if s == row else "?")
    return tuple(kinds)


def _rows_rows(specs, attrs) -> list[SbpRow]:
    """The signatures that follow from the parts': split on an axis outside the rows (inputs of
    one row's shape stay whole, per-row inputs split alike), or all replicated; each a row when
    every part has it in turn."""
    program, outputs = attrs["program"], attrs["outputs"]
    parts = _walk(program, specs)
    shape, axes = _rows_shape(program, specs)
    kinds = _input_kinds(program, specs, shape, axes)
    candidates = [tuple(R.S(i) if k in ("full", "lead") else B for k in kinds) for i in range(len(shape) - axes)]
    candidates.append(tuple(B for _ in kinds))
    return _follow(parts, candidates, outputs, f"follows from its parts ({describe(program)})")


@register("fused_rows", infer=_rows_infer, sbp=_rows_rows, cost=_cost, multi_output=True, low_precision="native")
def fused_rows(xp, *ins, program, outputs):
    """Elementwise parts around one row reduction (layer norm, softmax) in one kernel (see above)."""
    prog = program_of(program)
    outputs = tuple(outputs)
    plan = _row_plan(prog, outputs, ins) if xp is np else None
    if plan is not None:
        return _run_rows(plan, ins)
    return tuple(_listed(_each_part(xp, prog, ins), outputs))


def rows_usable(program, ins) -> bool:
    """Whether the generated row kernel takes ``ins``: Numba on, NumPy arrays of the rows' shape,
    one row's shape, one value per row or 0-d, the floating ones of one dtype the kernels take
    (per-row ones may be integers: class indices), every part with a rule, every row part over
    the same trailing axes."""
    if not fused.ENABLED or any(type(a) is not np.ndarray for a in ins):
        return False
    if any(OPS[op].scalar is None and OPS[op].row is None for op, _, _ in program):
        return False
    j_row, axes = _row_part(program)
    if axes is None or any(OPS[op].row is not None and OPS[op].row.axes(dict(at)) != axes for op, _, at in program):
        return False
    specs = [Spec(a.shape, a.dtype) for a in ins]
    shape, _ = _rows_shape(program, specs)
    if len(shape) < axes:
        return False
    kinds = _input_kinds(program, specs, shape, axes)
    floats = {a.dtype for a, kind in zip(ins, kinds) if not (kind == "lead" and a.dtype.kind in "iu")}
    return "?" not in kinds and len(floats) == 1 and next(iter(floats)) in GENERATED_DTYPES


def _exprs(program, n: int) -> list[sc.Expr]:
    """Each part's result as one expression over the inputs (row parts hold their reductions)."""
    temps: list[sc.Expr] = []
    for op, args, at in program:
        arg_exprs = _args(args, [sc.arg(k) for k in range(n)], temps)
        spec = OPS[op]
        if spec.row is not None:
            rule = spec.row.expr(sc.ROW, *(sc.arg(k) for k in range(len(args))), **dict(at))
        else:
            rule = sc.evaluate(spec.scalar, len(args), dict(at))
        if isinstance(rule, tuple):  # several outputs (layer norm's dx, dw, db): the part is one of them each
            temps.append(tuple(sc.substitute(sc._e(r), arg_exprs) for r in rule))
        else:
            temps.append(sc.substitute(sc._e(rule), arg_exprs))
    return temps


def rows_source(program, outputs, kinds: tuple[str, ...], dtype, ints: tuple[bool, ...] = (),
                inplace: bool = False, consts: dict | None = None) -> str:
    """The generated Numba kernel's source: ``kernel(i0, ..., o0, ..., lo, hi, n, nq)`` computes rows
    ``lo`` to ``hi`` (each ``n`` elements, ``nq`` rows per matrix) of flat arrays. ``ints[k]``: input k holds integers
    (read as they are). An output that does not vary along the row (cross entropy's loss) is
    written once per row."""
    storage, dtype = np.dtype(dtype), _compute(dtype)
    f32_ = dtype == np.float32
    ints = ints or (False,) * len(kinds)
    consts = {} if consts is None else consts
    exprs = _exprs(program, len(kinds))
    outs = _listed(exprs, outputs)
    colsum = [q for q, e in enumerate(outs) if e.op == "csum"]
    outs = [e.args[0] if e.op == "csum" else e for e in outs]  # a column sum's summand, per element
    reds = sc.reductions(outs)
    # a causal row op alone stops each row's passes at its diagonal ("m" elements) and writes 0 past it
    causal = _causal(program) and not colsum and all(r.op != "rmean" for r in reds)
    span = "m" if causal else "n"
    names = []
    for k, kind in enumerate(kinds):
        at = {"full": f"v{k}[j]", "row": f"i{k}[j]", "lead": f"l{k}", "scalar": f"s{k}"}[kind]
        names.append(at if ints[k] or kind in ("scalar", "lead") else _read(storage, at))
    elementwise = {k for k, kind in enumerate(kinds) if kind in ("full", "row")}
    c = (lambda v: f"f32({v})") if f32_ else (lambda v: v)
    bound: dict = {}
    body = []
    scratch = []
    # Reductions that do not need each other's results share one pass (layer norm's gradient
    # sums g w and g w y together): each one's level is one more than the deepest it holds.
    level: dict = {}
    for red in reds:
        level[red] = 1 + max((level[r] for r in reds if r is not red and sc.holds(red.args[0], r)), default=0)
    for depth in sorted(set(level.values())):
        sums = []
        for m, red in enumerate(reds):
            if level[red] != depth:
                continue
            inner_e = red.args[0]
            inner = sc.render(inner_e, names, "numba", dtype, bound, consts)
            plain = next((f"v{k}" for k, kind in enumerate(kinds) if kind == "full" and not ints[k]
                          and storage != bfloat16 and inner == names[k]), None)
            # a costly summand needed again later (softmax's exponentials) is kept in a row-long
            # scratch array instead of being computed twice; so is a maximum's argument unless it
            # is an input row already (the maximum then runs as one vectorised pass: _row_max)
            later = outs + [r.args[0] for r in reds if level[r] > depth]
            stash = (red.op == "rmax" and plain is None) or \
                (sc.calls(inner_e) and any(sc.holds(e, inner_e, skip=red) for e in later))
            if stash:
                scratch.append(m)
            if red.op == "rmax":
                if stash:
                    body += [f"for j in range({span}):", f"    t{m}[j] = {inner}"]
                body.append(f"r{m} = _row_max({f't{m}' if stash else plain}, {span})")
            else:
                sums.append((m, red, inner, stash))
            if stash:
                bound[inner_e] = f"t{m}[j]"
        if sums:
            body += [f"a{m} = {c('0.0')}" for m, _, _, _ in sums]
            body.append(f"for j in range({span}):")
            for m, _, inner, stash in sums:
                body += [f"    t{m}[j] = {inner}", f"    a{m} += t{m}[j]"] if stash else [f"    a{m} += {inner}"]
            body += [f"r{m} = a{m} / {c('n')}" if red.op == "rmean" else f"r{m} = a{m}" for m, red, _, _ in sums]
        for m, red in enumerate(reds):
            if level[red] == depth:
                bound[red] = f"r{m}"
    per_row = [q for q, e in enumerate(outs) if q not in colsum and not sc.per_element(e, elementwise)]
    body += [f"o{q}[r] = {_write(storage, sc.render(outs[q], names, 'numba', dtype, bound, consts))}" for q in per_row]
    if len(per_row) < len(outs):
        body.append(f"for j in range({span}):")
        # each output's value once (a column sum of another output, bias_gelu's, reads its value),
        # then the stores; column sums accumulate into the caller's float64 partials (one per
        # thread: o{q} is its own)
        values: dict[str, str] = {}
        for q, e in enumerate(outs):
            if q not in per_row:
                text = sc.render(e, names, "numba", dtype, bound, consts)
                if text not in values:
                    values[text] = f"e{q}"
                    body.append(f"    e{q} = {text}")
                body.append(f"    {'c' if f32_ else 'o'}{q}[j] += {values[text]}" if q in colsum
                            else f"    p{q}[j] = {_write(storage, values[text])}")
        if colsum and f32_:
            # float32 column sums over blocks of 32 rows, each block's added into the float64
            # partial: float64 adds in the loop above halved its speed (bias_gelu_grad: 846 -> 448 us)
            body.append("if (r - lo) % 32 == 31 or r == hi - 1:")
            body.append("    for j in range(n):")
            body += [line for q in colsum for line in (f"        o{q}[j] += c{q}[j]", f"        c{q}[j] = f32(0.0)")]
        if causal:
            body += ["for j in range(m, n):"] + [f"    p{q}[j] = {_write(storage, c('0.0'))}"
                                                  for q in range(len(outs)) if q not in per_row]
    flags = "fastmath=_FLAGS, " if f32_ else ""
    # in place, the first output is the first input, passed once (two names for one array would
    # keep the compiler from vectorising the loops)
    params = [f"i{k}" for k in range(len(kinds))] + [f"o{q}" for q in range(int(inplace), len(outs))]
    return "\n".join([
        f'"""Generated by flowsys.ops.fusion ({storage.name}): {describe(program)}, rows."""',
        *_HEADER,
        f"@numba.njit({flags}nogil=True, error_model='numpy', cache=True)",
        f"def kernel({', '.join(params)}, lo, hi, n, nq, kc, go):",
        "    _wide()",
        "    _release(go)",
        *_constants(consts),
        *[f"    s{k} = {f'i{k}[0]' if ints[k] else _read(storage, f'i{k}[0]')}" for k, kind in enumerate(kinds)
          if kind == "scalar"],
        *[f"    t{m} = np.empty(n, {'np.float32' if f32_ else 'np.float64'})" for m in scratch],
        *[f"    c{q} = np.zeros(n, np.float32)" for q in (colsum if f32_ else ())],
        "    for r in range(lo, hi):",
        "        qi = r % nq",  # the row's index along the second-to-last axis
        *(["        m = min(n, qi + 1)"] if causal else []),  # the row's keys up to its query
        "        b = r * n",  # one row's slices: indices Numba knows are in range, so the loops vectorise
        *[f"        v{k} = i{k}[b:b + n]" for k, kind in enumerate(kinds) if kind == "full"],
        *[f"        p{q} = {'i0' if inplace and q == 0 else f'o{q}'}[b:b + n]" for q in range(len(outs))
          if q not in per_row and q not in colsum],
        # per-row values read once per row (inside the loops they would be loaded again and again)
        *[f"        l{k} = {f'i{k}[r]' if ints[k] else _read(storage, f'i{k}[r]')}" for k, kind in enumerate(kinds)
          if kind == "lead"],
        *[f"        {line}" for line in body],
        "",
    ])


def _causal(program) -> bool:
    """Whether the program is one causal row op alone (``RowRule.causal``): its kernel stops each
    row at the diagonal. Not with parts after it, which need not keep a masked 0 at 0."""
    if len(program) != 1:
        return False
    op, _, at = program[0]
    rule = OPS[op].row
    return rule is not None and rule.causal is not None and bool(rule.causal(dict(at)))


_row_plans: dict[tuple, tuple] = {}


def _row_plan(program, outputs, ins, inplace: bool = False) -> tuple | None:
    """(kernel, each output's shape and dtype, row length, rows) for these inputs' shapes and
    dtypes, or None where the generated kernel does not take them; worked out once per program
    and shapes."""
    if not fused.ENABLED:
        return None
    key = (program, outputs, tuple((a.shape, a.dtype.str) for a in ins), inplace)
    plan = _row_plans.get(key, False)
    if plan is False:
        plan = None
        if rows_usable(program, ins):
            specs = [Spec(a.shape, a.dtype) for a in ins]
            shape, axes = _rows_shape(program, specs)
            kinds = _input_kinds(program, specs, shape, axes)
            ints = tuple(a.dtype.kind in "iu" for a in ins)
            dtype = next(a.dtype for a, i in zip(ins, ints) if not i)
            parts = _walk(program, specs)
            out_specs = tuple((tuple(sp.shape), dtype) for sp in _listed([part[4] for part in parts], outputs))
            sums = tuple(e.op == "csum" for e in _listed(_exprs(program, len(ins)), outputs))
            n = math.prod(shape[len(shape) - axes:])
            consts: dict = {}
            kern = _load(rows_source(program, outputs, kinds, dtype, ints, inplace, consts), "rows")
            nq = shape[-1 - axes] if len(shape) > axes else 1
            plan = (kern, out_specs, n, math.prod(shape) // max(n, 1), max(nq, 1), sums, inplace, _values(consts, dtype))
        _row_plans[key] = plan
    return plan


def _run_rows(plan, ins, out=None):
    """The plan's kernel over ``ins``, into new arrays or ``out`` (a row is read in full before
    any of it is written, so an output may be its own input: attention's scores)."""
    kern, out_specs, n, rows, nq, sums, inplace, kc = plan
    flat = _flat(ins)
    outs = out or tuple(None if s else np.empty(shape, dtype) for (shape, dtype), s in zip(out_specs, sums))
    flat_outs = [None if o is None else _bits(o.reshape(-1)) for o in outs]
    partials = []

    def part(lo, hi, go):
        mine = [np.zeros(n, np.float64) if s else f for f, s in zip(flat_outs, sums)]
        kern(*flat, *mine[int(inplace):], lo, hi, n, nq, kc, go)
        if any(sums):
            partials.append(mine)

    fused._split_go(part, rows, max(n, 1))
    if not any(sums):
        return outs
    return tuple(sum(p[q] for p in partials).astype(dtype).reshape(shape) if s else o
                 for q, (o, (shape, dtype), s) in enumerate(zip(outs, out_specs, sums)))


def row_one(op: str, ins, out=None, **attrs):
    """Op ``op`` (one with a row rule) alone through its generated kernel, into a new array or
    ``out`` (C-contiguous, the output's shape and dtype; it may be the first input); None where
    that kernel cannot take ``ins`` (the caller runs its xp expression)."""
    program = ((op, tuple(("in", k) for k in range(len(ins))), tuple(sorted(attrs.items()))),)
    inplace = out is not None and out is ins[0]
    plan = _row_plan(program, (0,), ins, inplace)
    if plan is None or (out is not None and (type(out) is not np.ndarray or not out.flags.c_contiguous
                                             or (out.shape, out.dtype) != plan[1][0])):
        return None
    outs = _run_rows(plan, ins, None if out is None else (out,))
    return outs if len(outs) > 1 else outs[0]
