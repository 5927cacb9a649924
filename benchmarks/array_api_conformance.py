"""The Python array API standard's own conformance suite, run against an array namespace.

    python benchmarks/array_api_conformance.py --suite PATH [--module flowsys] [--max-examples 20]
        [--timeout 1800] [--test-timeout 300] [-k EXPR] [--files test_constants.py ...]
        [--out benchmarks/results/array_api_conformance.json] [--update-readme]

``--suite`` is a checkout of https://github.com/data-apis/array-api-tests, e.g.
``../shared/array-api-tests``. In a subprocess whose cwd is the suite, it runs

    python -m pytest -q -p no:cacheprovider --max-examples=N --json-report ... array_api_tests/

with ARRAY_API_TESTS_MODULE=<module>, ARRAY_API_TESTS_VERSION=2024.12 and this repo on PYTHONPATH.
No dtype and no test is skipped by us (the suite's own skips.txt / xfails.txt are replaced by
empty files); the suite itself skips what the namespace lacks (an extension such as ``linalg``),
tests of a later standard and a few it marks flaky: ``skip_reasons`` in the JSON counts them.
Nothing is written into the suite: no pytest cache, no bytecode, Hypothesis's database and the
JSON report go to a temporary directory.

The JSON written has per-test-file counts (passed / failed / skipped / error, xfailed / xpassed
if any), totals, the pass rate passed / (passed + failed + error) (skips excluded), the failing
tests with the first line of their message, and the suite's identity (a sha256 over its test
code; its version and upstream commit where the copy records them). ``crashed`` is true when the
interpreter died: killed by a signal, or gone without pytest's report (a pytest that refuses to
start, e.g. when the suite's conftest cannot import the namespace, is a ``problem`` but no crash).
``--update-readme`` puts a summary into README.md between the ``array-api`` markers, if present.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = "https://github.com/data-apis/array-api-tests"
API_VERSION = "2024.12"
START, END = "<!-- array-api:start -->", "<!-- array-api:end -->"
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
# Copies of the suite we have matched file by file against upstream's history: the sha256 this
# script computes over the copy -> the upstream commit (a copy without .git does not record it).
KNOWN_COPIES = {
    "810819b9167e1701c9c24715ddaf97aee0c1cabcabb6bae8073dd84131a4b29d": "55fcc60179efa2680ddd6cd926ddf17b83530e2b",
}


def suite_identity(suite: Path) -> dict:
    """A sha256 over the suite's test code, and its version / upstream commit where recorded."""
    files = sorted([*suite.glob("array_api_tests/*.py"), suite / "conftest.py"])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(suite).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    version = commit = None
    path = suite / "array_api_tests" / "_version.py"
    try:  # exec the source rather than import it, so that no bytecode is written into the suite
        ns = {"__file__": str(path), "__name__": "_suite_version"}
        exec(compile(path.read_text(), str(path), "exec"), ns)
        # Only a suite of its own counts: a git repo above the copy would give that repo's commit.
        # Without .git, the commit is there only if `git archive` expanded _version.py's keywords.
        v = ns["get_versions"]() if (suite / ".git").exists() else \
            ns["git_versions_from_keywords"](ns["get_keywords"](), "", False)
        version = v["version"] if v.get("version") != "0+unknown" else None
        commit = v.get("full-revisionid")
    except Exception:  # unexpanded keywords (NotThisMethod), no git, or no _version.py
        pass
    sha = digest.hexdigest()
    return {"sha256": sha, "files_hashed": len(files), "version": version,
            "upstream_commit": commit or KNOWN_COPIES.get(sha)}


def first_line(text: str, limit: int = 200) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def tally(report: dict) -> tuple[dict, list, Counter]:
    """Counts of each outcome per test file, the failing tests with their message, and why tests skipped."""
    counts: dict[str, Counter] = defaultdict(Counter)
    failing, skip_reasons = [], Counter()
    for c in report.get("collectors", []):  # a file that fails to import is one error
        if c.get("outcome") == "failed":
            counts[Path(c["nodeid"].split("::")[0]).name or "(collection)"]["error"] += 1
            failing.append({"nodeid": c["nodeid"], "outcome": "error", "message": first_line(c.get("longrepr", ""))})
    for t in report.get("tests", []):
        counts[Path(t["nodeid"].split("::")[0]).name][t["outcome"]] += 1
        if t["outcome"] in ("failed", "error"):
            stage = next((t[s] for s in ("setup", "call", "teardown") if t.get(s, {}).get("outcome") == "failed"), {})
            message = (stage.get("crash") or {}).get("message") or stage.get("longrepr", "")
            failing.append({"nodeid": t["nodeid"], "outcome": t["outcome"], "message": first_line(message)})
        elif t["outcome"] == "skipped":  # longrepr: "('file', line, 'Skipped: why')"
            stage = next((t[s] for s in ("setup", "call") if t.get(s, {}).get("outcome") == "skipped"), {})
            skip_reasons[first_line(stage.get("longrepr", "")).split("Skipped: ", 1)[-1].rstrip("')\"")] += 1
    return counts, failing, skip_reasons


def row(c: Counter) -> dict:
    out = {k: c[k] for k in OUTCOMES if k in ("passed", "failed", "error", "skipped") or c[k]}
    ran = c["passed"] + c["failed"] + c["error"]
    out["pass_pct"] = round(100 * c["passed"] / ran, 1) if ran else None
    return out


def run_suite(args: argparse.Namespace, suite: Path, tmp: Path) -> dict:
    report = tmp / "report.json"
    targets = [f"array_api_tests/{Path(f).name}" for f in args.files] or ["array_api_tests/"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
           f"--max-examples={args.max_examples}", f"--skips-file={os.devnull}", f"--xfails-file={os.devnull}",
           "--json-report", f"--json-report-file={report}", *targets]
    if importlib.util.find_spec("pytest_timeout"):  # per test; the suite's pytest.ini sets no timeout
        cmd += ["-o", f"timeout={args.test_timeout}"]
    if args.k:
        cmd += ["-k", args.k]
    env = {**os.environ, "ARRAY_API_TESTS_MODULE": args.module, "ARRAY_API_TESTS_VERSION": API_VERSION,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONDONTWRITEBYTECODE": "1", "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp / "hypothesis"),
           # the reference namespace defaults to the newest standard; hold it to the one tested
           "ARRAY_API_STRICT_API_VERSION": API_VERSION}
    log = tmp / "pytest.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=suite, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    result = {"command": " ".join(cmd[1:]), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
              "timed_out": rc is None, "crashed": False, "problem": None}
    lines = log.read_text(errors="replace").splitlines()
    if rc is None:
        result["problem"] = f"timed out after {args.timeout:.0f} s"
    elif rc < 0:
        result.update(crashed=True, problem=f"the interpreter was killed by {signal.Signals(-rc).name}")
    elif not report.exists() and rc in (3, 4):  # pytest's internal / usage error: e.g. the conftest failed to import
        result["problem"] = f"pytest exited {rc} before running any test (see output_tail)"
    elif not report.exists():
        result.update(crashed=True, problem=f"the interpreter exited {rc} before pytest wrote its report")
    if result["problem"]:
        # faulthandler prints the crashed thread's stack, most recent call first: keep its top
        fatal = next((i for i, s in enumerate(lines) if s.startswith("Fatal Python error")), None)
        result["output_tail"] = lines[fatal:fatal + 30] if fatal is not None else lines[-40:]
        result["crashed_in"] = next((s.strip() for s in lines[fatal or 0:] if "array_api_tests/test_" in s), None)
    else:
        result["summary_line"] = lines[-1] if lines else ""
    result["report"] = json.loads(report.read_text()) if report.exists() else None
    return result


def readme_section(res: dict) -> str:
    ident, t = res["suite"], res["totals"]
    commit = ident["upstream_commit"]
    which = (f"commit [`{commit[:12]}`]({UPSTREAM}/tree/{commit}), " if commit else "") + \
        f"suite sha256 `{ident['sha256'][:12]}`"
    lines = [f"The Python array API standard's own test suite ([data-apis/array-api-tests]({UPSTREAM}), {which}), "
             f"run against `{res['module']}` for standard version {res['api_version']} with "
             f"`--max-examples={res['max_examples']}` and no dtype skipped: **{res['headline']}**."
             + (" No test crashes the interpreter." if not res["crashed"] else f" The run crashed: {res['problem']}."),
             "", "| test file | passed | failed | skipped | pass % |", "| --- | --- | --- | --- | --- |"]
    for name, c in [*res["files"].items(), ("total", t)]:
        pct = "-" if c["pass_pct"] is None else c["pass_pct"]
        lines.append(f"| {name} | {c['passed']} | {c['failed'] + c['error']} | {c['skipped']} | {pct} |")
    words = shlex.split(res["invocation"])  # the suite's local path is no path of this repository
    words = [("PATH" if i and words[i - 1] == "--suite" else "--suite=PATH" if w.startswith("--suite=") else w)
             for i, w in enumerate(words)]
    lines += ["", f"`{shlex.join(words)}` ({res['date']}, {res['seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, type=Path, help="the array-api-tests checkout")
    ap.add_argument("--module", default="flowsys", help="the array namespace to test (ARRAY_API_TESTS_MODULE)")
    ap.add_argument("--max-examples", type=int, default=20, help="Hypothesis examples per test")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")
    ap.add_argument("--test-timeout", type=float, default=300.0, help="seconds per test (needs pytest-timeout)")
    ap.add_argument("-k", help="pytest -k expression")
    ap.add_argument("--files", nargs="+", default=[], help="only these test files, e.g. test_constants.py")
    ap.add_argument("--out", default="benchmarks/results/array_api_conformance.json")
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    suite = args.suite.resolve()
    if not (suite / "array_api_tests").is_dir():
        ap.error(f"{suite} has no array_api_tests/: --suite must be an array-api-tests checkout")
    if missing := [f for f in args.files if not (suite / "array_api_tests" / Path(f).name).is_file()]:
        ap.error(f"no such test file in {suite / 'array_api_tests'}: {', '.join(missing)}")
    if importlib.util.find_spec("pytest_jsonreport") is None:
        print("pytest-json-report is not installed: pip install pytest-json-report", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="array-api-") as tmp:
        run = run_suite(args, suite, Path(tmp))
    report = run.pop("report")
    counts, failing, skip_reasons = tally(report or {})
    total = sum(counts.values(), Counter())
    res = {"benchmark": "array_api_conformance", "date": time.strftime("%Y-%m-%d"),
           "invocation": shlex.join(["python", "benchmarks/array_api_conformance.py", *sys.argv[1:]]),
           "suite_path": str(suite),
           "upstream": UPSTREAM, "suite": suite_identity(suite), "module": args.module, "api_version": API_VERSION,
           "max_examples": args.max_examples, "k": args.k, "files_selected": args.files or None,
           "python": platform.python_version(), "numpy": np.__version__, **run,
           "files": {name: row(counts[name]) for name in sorted(counts)}, "totals": row(total)}
    t = res["totals"]
    ran = t["passed"] + t["failed"] + t["error"]
    res["pass_rate"] = t["pass_pct"]
    res["headline"] = (f"{args.module} passes {t['passed']} of {ran} tests that run "
                       f"({t['pass_pct'] if ran else 0}%), {t['skipped']} skipped") if report else \
        f"{args.module}: no results ({run['problem']})"
    res["skip_reasons"] = dict(skip_reasons.most_common())
    res["failing"] = failing
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")

    print(f"{'test file':46} {'passed':>7} {'failed':>7} {'skipped':>8} {'pass %':>7}")
    for name, c in [*res["files"].items(), ("total", t)]:
        pct = "-" if c["pass_pct"] is None else f"{c['pass_pct']:.1f}"
        print(f"{name:46} {c['passed']:7} {c['failed'] + c['error']:7} {c['skipped']:8} {pct:>7}")
    print(res["headline"])
    if run["problem"]:
        print("\n".join(run["output_tail"]), file=sys.stderr)
        print(f"{'CRASHED' if run['crashed'] else 'NO RESULTS'}: {run['problem']}"
              + (f", in {run['crashed_in']}" if run["crashed_in"] else ""), file=sys.stderr)
    print(f"wrote {args.out}")
    if args.update_readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if START not in text or END not in text or report is None:
            print(f"README.md not updated: {'no report' if report is None else f'no {START} ... {END} markers'}",
                  file=sys.stderr)
            return 1
        head, rest = text.split(START, 1)
        readme.write_text(head + START + "\n" + readme_section(res) + END + rest.split(END, 1)[1])
        print("README.md updated")
    return 1 if report is None or run["problem"] else 0


if __name__ == "__main__":
    sys.exit(main())
