"""The one entry point: `gorila-zmq COMMAND ...`, one subcommand per role plus tools.

Every role subcommand takes `--config FILE` and `section.field=value` overrides, so dev mode, the
cluster launcher and the tests all start the same entry point with the same configuration.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, function, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "dev": ("gorila_zmq.launch.supervisor", "dev_main", "run every role on this host, supervised (dev mode)"),
    "ps": ("gorila_zmq.roles.ps", "main", "run one parameter-server shard"),
    "actor": ("gorila_zmq.roles.actor", "main", "run one actor"),
    "learner": ("gorila_zmq.roles.learner", "main", "run one learner"),
    "replay": ("gorila_zmq.roles.replay", "main", "run one global replay shard"),
    "evaluator": ("gorila_zmq.roles.evaluator", "evaluator_main", "run the evaluator role"),
    "eval": ("gorila_zmq.roles.evaluator", "eval_main", "evaluate a checkpoint with the null-op-starts protocol"),
    "status": ("gorila_zmq.launch.status", "main", "ask every live role of a run for its stats"),
    "keys": ("gorila_zmq.net.security", "keys_main", "make CurveZMQ keys for a cluster"),
    "cluster": ("gorila_zmq.launch.cluster", "main", "start, stop and inspect a run on several hosts over ssh"),
    "bench": ("gorila_zmq.bench", "main", "run a micro-benchmark against its baseline"),
    "config": ("gorila_zmq.cli", "config_main", "print every configuration field with its default and help"),
}


def register(name: str, module: str, func: str, help: str) -> None:
    COMMANDS[name] = (module, func, help)


def config_main(argv: list[str]) -> int:
    from gorila_zmq import config as C
    p = argparse.ArgumentParser(prog="gorila-zmq config", description=COMMANDS["config"][2])
    p.add_argument("--config", help="TOML file to resolve")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    a = p.parse_args(argv)
    cfg = C.load(a.config, a.overrides)
    print("\n".join(C.describe(cfg)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: gorila-zmq COMMAND [options]\n\ncommands:")
        for name, (_, _, h) in COMMANDS.items():
            print(f"  {name:<10} {h}")
        print("\n`gorila-zmq COMMAND --help` for a command's options.")
        return 0 if argv else 2
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(f"gorila-zmq: unknown command {cmd!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    mod, func, _ = COMMANDS[cmd]
    import zmq

    from gorila_zmq.config import ConfigError
    try:
        return int(getattr(importlib.import_module(mod), func)(argv[1:]) or 0)
    except (ConfigError, ValueError, RuntimeError, OSError, zmq.ZMQError) as e:
        # A wrong config, game name or argument: say what is wrong, not where (GORILA_DEBUG=1: traceback).
        if os.environ.get("GORILA_DEBUG"):
            raise
        print(f"gorila-zmq {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
