"""The ``flowsys`` command line.

    flowsys train JOB.yaml [section.key=value ...]   # config-driven GPT training
    flowsys launch --nodes N [--devices-per-node K] [--device cpu|cuda] [--address ADDR] [--profile TRACE.json]
                   train.py [args]

    flowsys plan JOB.yaml --devices N [--hardware SPEC] [--every-rank] [--json] [section.key=value ...]
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
    plan = sub.add_parser("plan", help="compile a job for N devices without running it")
    plan.add_argument("job", help="YAML job file")
    plan.add_argument("--devices", type=int, required=True)
    plan.add_argument("--every-rank", action="store_true", help="lower every rank, not one per pipeline stage")
    plan.add_argument("--json", action="store_true", help="print the summary as JSON")
    plan.add_argument("--hardware", default=None, metavar="SPEC",
                      help="predict step time, tokens/s, MFU and memory fit on this hardware spec "
                           "(cpu, a100-80g, h100-80g, or a YAML file)")
    plan.add_argument("overrides", nargs="*", help="section.key=value overrides")
    launch = sub.add_parser("launch", help="run a script as the driver of a (local, simulated) Ray cluster")
    launch.add_argument("--nodes", type=int, required=True, help="Ray nodes (simulated here without --address)")
    launch.add_argument("--devices-per-node", type=int, default=1)
    launch.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    launch.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    launch.add_argument("--max-restarts", type=int, default=0,
                        help="times a checkpointing `flowsys train` job resumes after a lost worker")
    launch.add_argument("--profile", default=None, metavar="TRACE.json",
                        help="record every actor firing on every rank; write one Chrome/Perfetto trace here")
    launch.add_argument("script", help="the training script")
    launch.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    args = ap.parse_args(argv)

    try:
        if args.command == "train":
            import os  # noqa: PLC0415

            from flowsys.train import load_job, run  # noqa: PLC0415 - keep `flowsys --help` fast

            job = load_job(args.job, _parse_overrides(args.overrides))
            c = job.cluster
            if c.backend == "ray" and os.environ.get("FLOWSYS_BACKEND") != "ray":  # not launched yet: launch
                from flowsys.launch import LaunchConfig, launch as run_launch  # noqa: PLC0415

                cfg = LaunchConfig(c.nodes, c.devices_per_node, "cpu", c.address or None)
                return run_launch(cfg, __file__, ["train", args.job, *args.overrides])
            run(job)
        elif args.command == "plan":
            import json  # noqa: PLC0415

            from flowsys.plan import format_plan, plan_job  # noqa: PLC0415
            from flowsys.train import load_job  # noqa: PLC0415

            summary = plan_job(load_job(args.job, _parse_overrides(args.overrides)), args.devices, args.every_rank,
                               hardware=args.hardware)
            print(json.dumps(summary, indent=2) if args.json else format_plan(summary))
        elif args.command == "launch":
            from flowsys.launch import LaunchConfig, launch as run_launch  # noqa: PLC0415

            cfg = LaunchConfig(args.nodes, args.devices_per_node, args.device, args.address, args.max_restarts,
                               profile=args.profile)
            return run_launch(cfg, args.script, args.args)
    except FlowsysError as e:
        print(f"flowsys {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
