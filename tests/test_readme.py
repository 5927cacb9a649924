"""The README's commands run, and the docs stand alone.

Commands: every ``flowsys ...`` and ``python examples/...`` line of README.md's fenced shell
blocks, and every such command of its prose that runs a file of the repository (a span naming
``examples/...``; a span such as ``flowsys train`` only names the command). They run in README
order, each once, in one scratch directory that sees the repository's ``examples/``, so a command
finds what an earlier one wrote (the checkpoint ``flowsys generate`` reads). Quick mode:
``flowsys train`` gets ``train.steps=2 train.eval_batches=1`` (and ``checkpoint.every=2`` when it
names a checkpoint directory), example scripts ``--steps 2``, and ``--nodes`` is at most 4.
Install, test and cluster-provisioning lines are skipped. A launch joins the test session's Ray
cluster (2 nodes, 2 devices each at most) instead of starting its own. ``RAY_ADDRESS=local``: a script that
starts Ray starts its own cluster, as on a machine that runs nothing else, instead of joining
another that runs here.

Docs: README.md and docs/*.md link only to files of the repository or to web addresses, and name
no document that the repository lacks."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
SKIPPED = ("pip ", "python -m pytest", "ray up", "ray down", "docker ", ".ci/")
QUICK_STEPS = ["train.steps=2", "train.eval_batches=1"]
# a command (its README text contains the key) -> the fix it waits for; remove the entry once it passes


def _fenced_and_prose(text: str) -> tuple[list[str], str]:
    """The lines of the fenced shell blocks (bash, sh, console, shell or unlabelled), and the
    text outside any fenced block."""
    lines, prose, fence = [], [], None
    for line in text.splitlines():
        m = re.match(r"^\s*```(\w*)", line)
        if m and fence is None:
            fence = m.group(1) or "text"
            continue
        if m:
            fence = None
            continue
        if fence is None:
            prose.append(line)
        elif fence in ("bash", "sh", "shell", "console", "text"):
            lines.append(line)
    return lines, "\n".join(prose)


def _is_command(text: str) -> bool:
    return (text.startswith("flowsys ") or text.startswith("python examples/")) and not text.startswith(SKIPPED)


def readme_commands(text: str) -> list[str]:
    """The README's runnable commands, in order of appearance, each once."""
    lines, prose = _fenced_and_prose(text)
    found = []  # (offset in the README, command)
    for line in lines:
        for part in line.split("&&"):
            part = part.strip().removeprefix("$ ").strip()
            if _is_command(part):
                found.append((text.find(line), part))
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())  # (a span may wrap across lines)
        if _is_command(span) and "examples/" in span:
            found.append((text.find(m.group(0).splitlines()[0]), span))
    out = []
    for _, command in sorted(found, key=lambda f: f[0]):
        if command not in out:
            out.append(command)
    return out


def quick(command: str, address: str | None = None) -> list[str]:
    """The command's argv in quick mode, run by this interpreter. With ``address`` (the test
    session's Ray cluster of 2 nodes) a launch joins that cluster instead of starting one, its
    devices as 2 nodes of up to 2 devices each (the same 4 ranks at most)."""
    words = shlex.split(command)
    words = ([sys.executable, "-m", "flowsys.cli"] if words[0] == "flowsys" else [sys.executable]) + words[1:]
    for i, w in enumerate(words[:-1]):
        if w == "--nodes":
            nodes = min(int(words[i + 1]), 4)
            words[i + 1] = str(nodes)
            if address is not None and "--address" not in words:
                words[i + 1:i + 2] = [str(min(nodes, 2)), "--devices-per-node", str(max(1, nodes // 2)),
                                      "--address", address]
            break
    for i, w in enumerate(words):
        if w.startswith("cluster.nodes="):
            nodes = min(int(w.split("=", 1)[1]), 4)
            words[i] = f"cluster.nodes={nodes}"
            if address is not None:
                words[i:i + 1] = [f"cluster.nodes={min(nodes, 2)}", f"cluster.devices_per_node={max(1, nodes // 2)}",
                                  f"cluster.address={address}"]
            break
    if "train" in words and any(w.endswith((".yaml", ".yml")) for w in words):  # flowsys train, or launched
        words += QUICK_STEPS + (["checkpoint.every=2"] if any(w.startswith("checkpoint.dir=") for w in words) else [])
    elif any(w.startswith("examples/") and w.endswith(".py") for w in words):  # the script's own arguments
        words += ["--steps", "2"]
    return words


COMMANDS = readme_commands(README.read_text())


def _param(command: str):
    return pytest.param(command, id=command[:80])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One scratch directory for all the commands, seeing the repository's examples/."""
    d = tmp_path_factory.mktemp("readme")
    (d / "examples").symlink_to(ROOT / "examples")
    return d


def test_the_readme_has_its_commands():
    assert "flowsys train examples/configs/tiny.yaml" in COMMANDS  # (the prose's, joined across a line break)
    assert "flowsys plan examples/configs/tiny_3d.yaml --devices 8" in COMMANDS
    assert any(c.startswith("flowsys generate ckpt") for c in COMMANDS)
    assert all(_is_command(c) for c in COMMANDS)
    assert quick("flowsys launch --nodes 16 -- flowsys train job.yaml checkpoint.dir=ck")[3:] == [
        "launch", "--nodes", "4", "--", "flowsys", "train", "job.yaml", "checkpoint.dir=ck", *QUICK_STEPS,
        "checkpoint.every=2"]
    assert quick("python examples/parallel_gpt.py")[1:] == ["examples/parallel_gpt.py", "--steps", "2"]
    assert quick("flowsys launch --nodes 4 examples/x.py", "A:1")[3:] == [
        "launch", "--nodes", "2", "--devices-per-node", "2", "--address", "A:1", "examples/x.py", "--steps", "2"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("command", [_param(c) for c in COMMANDS])
def test_readme_command_runs(command, workdir, ray_cluster):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("FLOWSYS_BACKEND", None)
    # a session of its own: on a timeout the command and everything it started (a launched Ray
    # cluster) are stopped together, by the group of the process this test started
    proc = subprocess.Popen(quick(command, ray_cluster.address), cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"`{command}` did not finish in 540 s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"`{command}` ({shlex.join(quick(command, ray_cluster.address))}) exited {proc.returncode}:\n{out[-4000:]}"


def _outside(doc: Path, text: str) -> list[str]:
    """What ``doc`` points to outside the repository: link targets that are neither web
    addresses nor files of the repository, relative paths that climb out of it, and documents
    (*.md) it names that the repository does not have."""
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^(https?|mailto):", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            bad.append(f"link {target}")
    bad += [f"path {p}" for p in re.findall(r"(?<![\w.])\.\./[^\s)`'\"]*", text)]  # (~/.cache is no reference)
    have = {p.name for p in ROOT.rglob("*.md") if ".git" not in p.parts}
    bad += [f"document {name}" for name in sorted(set(re.findall(r"\b[\w-]+\.md\b", text)) - have)]
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_docs_point_nowhere_outside_the_repository(doc):
    bad = _outside(doc, doc.read_text())
    assert not bad, (f"{doc.relative_to(ROOT)} points outside the repository: {bad}; link files of the repository, "
                     f"and cite upstream projects by name and URL")


def test_the_outside_check_finds_what_it_looks_for():
    text = "[a](../shared/STYLE.md) [b](docs/architecture.md) [c](https://arxiv.org/abs/2110.15032) see DESIGN.md"
    assert _outside(README, text) == ["link ../shared/STYLE.md", "path ../shared/STYLE.md", "document DESIGN.md",
                                      "document STYLE.md"]
