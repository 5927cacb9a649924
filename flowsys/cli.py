"""The ``flowsys`` command line.

    flowsys train JOB.yaml [section.key=value ...]   # config-driven GPT training

``launch`` and ``plan`` join when the distributed runtime and the compiler land.
"""

from __future__ import annotations

import argparse
import sys

from flowsys.errors import FlowsysError


def _parse_overrides(items: list[str]) -> dict[str, object]:
    import yaml  # noqa: PLC0415

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise FlowsysError(f"override {item!r} is not key=value (e.g. train.steps=50)")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flowsys", description="flowsys: distributed-first dataflow training")
    sub = ap.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a GPT from a job file")
    train.add_argument("job", help="YAML job file (sections: model, optim, data, train)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = ap.parse_args(argv)

    from flowsys.train import load_job, run  # noqa: PLC0415 - keep `flowsys --help` fast

    try:
        if args.command == "train":
            run(load_job(args.job, _parse_overrides(args.overrides)))
    except FlowsysError as e:
        print(f"flowsys {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
