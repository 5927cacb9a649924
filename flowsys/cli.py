"""The ``flowsys`` command line.

    flowsys train JOB.yaml [section.key=value ...]   # config-driven GPT training (--help lists every key)
    flowsys plan JOB.yaml --devices N [--hardware SPEC [--trace PATH]] [--every-rank] [--json] [section.key=value ...]
    flowsys plan JOB.yaml --devices N --auto [--hardware SPEC] [--top K] [--simulate K] [--time-budget S] [--json]
    flowsys launch [--nodes N] [--devices-per-node K] [--device cpu|cuda] [--address ADDR] [--profile TRACE.json]
                   (script.py [args] | -- flowsys train JOB.yaml [...])
    flowsys prepare SRC --out DIR [...]               # text -> token shards for data.source
    flowsys generate CHECKPOINT --prompt TEXT [...]   # sample from a trained model
    flowsys export CHECKPOINT --to hf-gpt2 OUT        # a Hugging Face GPT-2 model directory
    flowsys --version

Errors are one line naming what is wrong (exit 2); Ctrl-C ends a command with one line (exit 130).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from flowsys import __version__
from flowsys.errors import ConfigError, FlowsysError

# subcommands whose module gives add_arguments(parser) and main(args) -> int, imported only when
# the subcommand runs (`flowsys --help` stays fast)
MODULES = {
    "prepare": ("flowsys.prepare", "tokenize text files or JSONL into train.bin/val.bin for data.source"),
    "generate": ("flowsys.generate", "sample text from a checkpoint of a trained model"),
    "export": ("flowsys.export", "write a checkpoint as a Hugging Face GPT-2 model directory"),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The argument parser; the costly parts (the job schema for ``train --help``, a module's
    own arguments) only for the ``command`` being run."""
    ap = argparse.ArgumentParser(prog="flowsys", description="flowsys: distributed-first dataflow training")
    ap.add_argument("--version", action="version", version=f"flowsys {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    epilog = None
    if command == "train":
        from flowsys.job import describe_schema  # noqa: PLC0415 - imports the model: only for train

        epilog = describe_schema() + "\n\nValues are YAML 1.2 (3e-4 is a float; yes/no are strings)."
    train = sub.add_parser("train", help="train a GPT from a job file", epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train a GPT from a YAML job file on one device or a parallel layout.")
    train.add_argument("job", help="YAML job file (sections: model, optim, data, train, parallel, cluster, checkpoint)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, e.g. train.steps=50")
    plan = sub.add_parser("plan", help="compile a job for N devices without running it")
    plan.add_argument("job", help="YAML job file")
    plan.add_argument("--devices", type=int, required=True)
    plan.add_argument("--every-rank", action="store_true", help="lower every rank, not one per pipeline stage")
    plan.add_argument("--auto", action="store_true",
                      help="search the layout (dp, tp, pp, ZeRO, micro-batches, checkpointing) for the devices; "
                           "predicts on --hardware, else the job's train.hardware, else cpu")
    plan.add_argument("--top", type=int, default=5, help="with --auto: layouts shown (default 5)")
    plan.add_argument("--simulate", type=int, default=8,
                      help="with --auto: layouts the cost model simulates after the analytic pre-filter (default 8)")
    plan.add_argument("--time-budget", type=float, default=200.0, metavar="S",
                      help="with --auto: after the first simulation, start none that might end past S seconds, the job's own layout included (default 200)")
    plan.add_argument("--json", action="store_true", help="print the summary as JSON")
    plan.add_argument("--hardware", default=None, metavar="SPEC",
                      help="predict step time, tokens/s, MFU and memory fit on this hardware spec "
                           "(cpu, a100-40g, a100-80g, h100-80g, h200, or a YAML file)")
    plan.add_argument("--trace", default=None, metavar="PATH",
                      help="with --hardware: write the simulated step as a Perfetto trace (fs.profile's format)")
    plan.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides")
    launch = sub.add_parser("launch", help="run a script or a flowsys command as the driver of a Ray cluster",
                            usage="flowsys launch [options] (script.py [args] | -- flowsys COMMAND [args])")
    launch.add_argument("--nodes", type=int, default=1, help="Ray nodes (simulated here without --address; default 1)")
    launch.add_argument("--devices-per-node", type=int, default=1)
    launch.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    launch.add_argument("--address", default=None, help="join this Ray cluster (host:port) instead of starting one")
    launch.add_argument("--max-restarts", type=int, default=0,
                        help="times a checkpointing `flowsys train` job resumes after a lost worker")
    launch.add_argument("--profile", default=None, metavar="TRACE.json",
                        help="record every actor firing on every rank; write one Chrome/Perfetto trace here")
    launch.add_argument("script", help="the training script, or (after --) flowsys")
    launch.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    for name, (module, summary) in MODULES.items():
        parser = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            _module(name).add_arguments(parser)
    return ap


def _module(name: str):
    module = MODULES[name][0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ConfigError(f"this flowsys has no {module} module, so no `flowsys {name}`") from None


def _train(args) -> int:
    from flowsys.job import load_job, parse_overrides  # noqa: PLC0415 - keep `flowsys --help` fast

    job = load_job(args.job, parse_overrides(args.overrides))
    c = job.cluster
    if c.backend == "ray" and os.environ.get("FLOWSYS_BACKEND") != "ray":  # not launched yet: launch
        from flowsys.launch import LaunchConfig, launch  # noqa: PLC0415

        cfg = LaunchConfig(c.nodes, c.devices_per_node, "cpu", c.address or None)
        return launch(cfg, "flowsys", ["train", args.job, *args.overrides])
    from flowsys.train import run  # noqa: PLC0415

    run(job)
    return 0


def _plan(args) -> int:
    import json  # noqa: PLC0415

    from flowsys.job import load_job, parse_overrides  # noqa: PLC0415
    from flowsys.plan import format_plan, plan_job  # noqa: PLC0415

    if args.auto:
        from flowsys.autoplan import format_search, search  # noqa: PLC0415

        if args.trace or args.every_rank:
            raise ConfigError("flowsys plan: --auto searches the layout; run plan with --trace or --every-rank "
                              "on the layout it finds (its overrides are printed)")
        result = search(load_job(args.job, parse_overrides(args.overrides)), args.devices, args.hardware,
                        top=args.top, simulate=args.simulate, time_budget=args.time_budget)
        print(json.dumps(result.to_dict(), indent=2) if args.json else format_search(result))
        return 0
    if args.trace and not args.hardware:
        raise ConfigError("flowsys plan: --trace writes the predicted step, so it needs --hardware SPEC "
                          "(e.g. --hardware a100-80g)")
    summary = plan_job(load_job(args.job, parse_overrides(args.overrides)), args.devices, args.every_rank,
                       hardware=args.hardware, trace=args.trace)
    print(json.dumps(summary, indent=2) if args.json else format_plan(summary))
    return 0


def _launch(args) -> int:
    from flowsys.launch import LaunchConfig, launch  # noqa: PLC0415

    cfg = LaunchConfig(args.nodes, args.devices_per_node, args.device, args.address, args.max_restarts,
                       profile=args.profile)
    return launch(cfg, args.script, args.args)


COMMANDS = {"train": _train, "plan": _plan, "launch": _launch}


def _interrupt(signum, frame) -> None:
    """The first Ctrl-C stops the command; more while it cleans up are ignored (a launched
    driver gets one from the terminal and one passed on by ``flowsys launch``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        parser = _parser(command)
    except FlowsysError as e:  # a subcommand whose module is missing
        print(f"flowsys {command}: error: {e}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if extra and command in ("train", "plan") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra  # overrides after an option: flowsys plan JOB --devices 8 train.steps=5
    elif extra:
        parser.parse_args(argv)  # argparse's own message and exit status
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _interrupt) if main_thread else None
    try:
        if args.command in MODULES:
            return int(_module(args.command).main(args) or 0)
        return COMMANDS[args.command](args)
    except FlowsysError as e:
        print(f"flowsys {args.command}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowsys {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
