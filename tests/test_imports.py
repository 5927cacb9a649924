"""Import-time boundaries (docs/architecture.md, "Packages": the direction of imports), each checked in a fresh interpreter:
the shared vocabulary loads nothing of the user API, a worker's modules run without ``nn``,
``optim`` or ``Graph``, ``scheduler`` and ``actors`` do not use each other, and ``comm`` uses
nothing of ours. ``import flowsys`` itself is light: its public names load on first use."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("flowsys", "scheduler", "actors", "comm")
VOCABULARY = ["flowsys.ops", "flowsys.sbp", "flowsys.placement", "flowsys.layout", "flowsys.errors", "flowsys.graph.ir",
              "flowsys.planformat", "flowsys.planformat.order", "flowsys.rng", "flowsys.datasource",
              "flowsys.shardfiles"]
WORKER = ["actors", "actors.worker", "actors.runtime", "actors.backends"]
USER_API = {"flowsys.nn", "flowsys.optim", "flowsys.graph.api"}


def run(code: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def loaded_by(modules: list[str]) -> set[str]:
    """Our modules in ``sys.modules`` after a fresh interpreter imports ``modules``."""
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in %r))" % (OURS,)
    return set(run(code).split())


def imported_names(package: str) -> set[str]:
    """Every module named by an import statement anywhere in ``package``'s files, function
    bodies included (a function-level import is still a dependency)."""
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        if path.name.endswith("_pb2.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return names


def test_vocabulary_loads_no_user_api_and_nothing_outside_flowsys():
    loaded = loaded_by(VOCABULARY)
    assert set(VOCABULARY) <= loaded
    assert not USER_API & loaded, f"the vocabulary loads the user API: {sorted(USER_API & loaded)}"
    outside = {m for m in loaded if not m.startswith("flowsys")}
    assert not outside, f"the vocabulary imports {sorted(outside)}"


@pytest.mark.parametrize("module", WORKER)
def test_worker_modules_load_no_user_api(module):
    loaded = loaded_by([module])
    assert not USER_API & loaded, f"{module} loads the user API: {sorted(USER_API & loaded)}"
    assert not any(m.split(".")[0] == "scheduler" for m in loaded), f"{module} loads the scheduler"


def test_scheduler_and_actors_do_not_use_each_other():
    assert not {n for n in imported_names("scheduler") if n.split(".")[0] == "actors"}
    assert not {n for n in imported_names("actors") if n.split(".")[0] == "scheduler"}
    loaded = loaded_by(["scheduler", "scheduler.lower", "scheduler.cost"])
    assert not any(m.split(".")[0] == "actors" for m in loaded)


def test_comm_imports_nothing_of_ours():
    assert not {n for n in imported_names("comm") if n.split(".")[0] in OURS and n.split(".")[0] != "comm"}
    loaded = loaded_by(["comm", "comm.grpc_transport", "comm.nccl"])
    assert {m.split(".")[0] for m in loaded} == {"comm"}


def test_import_flowsys_is_light_and_exports_lazily():
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "FLOWSYS_PROFILE")}
    out = run("""
import os, sys
import flowsys as fs
heavy = {"flowsys.tensor", "flowsys.nn", "flowsys.optim", "flowsys.graph.api"}
assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules))
assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "18", "settle_blas_threads ran at import"
assert set(fs.__all__) <= set(dir(fs))
import flowsys.tensor  # binds the submodule on the package: the public function keeps the name
from flowsys.functions import tensor
from flowsys.graph.api import Graph
from flowsys.nn.layers import Linear
assert fs.tensor is tensor and fs.Graph is Graph and fs.nn.Linear is Linear
from flowsys import nn, optim, init, GraphError
import flowsys.nn.functional as F
assert F.relu and optim.AdamW and init and GraphError
for name in fs.__all__:
    getattr(fs, name)
try:
    fs.no_such_name
except AttributeError as e:
    print(e)
""", env=env)
    assert "module 'flowsys' has no attribute 'no_such_name'" in out
