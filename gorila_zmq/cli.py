"""The one entry point: `gorila-zmq COMMAND ...`, one subcommand per role plus tools.

Every role subcommand takes `--config FILE` and `section.field=value` overrides, so dev mode, the
cluster launcher and the tests all start the same entry point with the same configuration. A user's
mistake (gorila_zmq.fields.UserError: a bad config, an unknown game, an unreachable host) is one line
and exit code 2; any other error keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

# command -> (module, function, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "dev": ("gorila_zmq.launch.supervisor", "dev_main", "run every role on this host, supervised (dev mode)"),
    "ps": ("gorila_zmq.roles.ps", "main", "run one parameter-server shard"),
    "actor": ("gorila_zmq.roles.actor", "main", "run one actor"),
    "learner": ("gorila_zmq.roles.learner", "main", "run one learner"),
    "replay": ("gorila_zmq.roles.replay", "main", "run one global replay shard"),
    "relay": ("gorila_zmq.roles.relay", "main", "hand theta to this host's actors and learners (net.param_relay)"),
    "evaluator": ("gorila_zmq.roles.evaluator", "evaluator_main", "run the evaluator role"),
    "eval": ("gorila_zmq.cli", "eval_main", "evaluate a checkpoint with the null-op-starts protocol"),
    "status": ("gorila_zmq.launch.status", "main", "ask every live role of a run for its stats"),
    "clean": ("gorila_zmq.launch.clean", "main", "remove the shared memory of a run that is not live (or --stale)"),
    "keys": ("gorila_zmq.net.security", "keys_main", "make CurveZMQ keys for a cluster"),
    "cluster": ("gorila_zmq.launch.cluster", "main", "start, stop and inspect a run on several hosts over ssh"),
    "slurm": ("gorila_zmq.launch.slurm", "main", "submit, inspect and cancel a run as a Slurm job"),
    "bench": ("gorila_zmq.bench", "main", "run a micro-benchmark against its baseline"),
    "scale": ("gorila_zmq.launch.scale", "main", "predict a layout's throughput, staleness and bandwidth (scale plan)"),
    "plot": ("gorila_zmq.plot", "main", "draw runs' evaluation curves (return vs frames and wall time) to an image"),
    "config": ("gorila_zmq.cli", "config_main", "print every configuration field with its default and help"),
}


def config_main(argv: list[str]) -> int:
    from gorila_zmq import config as C
    p = argparse.ArgumentParser(prog="gorila-zmq config", description=COMMANDS["config"][2])
    p.add_argument("--config", help="TOML file to resolve")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    a = p.parse_args(argv)
    cfg = C.load(a.config, a.overrides)
    print("\n".join(C.describe(cfg)))
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return v


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], not {text!r}")
    return v


def eval_main(argv: list[str]) -> int:
    from gorila_zmq import config as C
    from gorila_zmq.agents import base as agents
    from gorila_zmq.envs.scores import summarize
    from gorila_zmq.ps.layout import ParamLayout
    from gorila_zmq.roles.evaluator import load_params, protocol, run_episodes
    p = argparse.ArgumentParser(prog="gorila-zmq eval", description=COMMANDS["eval"][2])
    p.add_argument("--checkpoint", required=True, help="an evaluation checkpoint (run_dir/best.npz)")
    p.add_argument("--env", help="game or gymnasium id (default: the one the checkpoint was trained on)")
    p.add_argument("--episodes", type=_positive_int, default=None, help="default: eval.episodes (30)")
    p.add_argument("--epsilon", type=_probability, default=None, help="default: eval.epsilon (0.05)")
    p.add_argument("--seed", type=int, default=0, help="the episodes' seed (an evaluation record's `seed` plays "
                   "its episodes again)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (default: the checkpoint's agent.torch_threads, as the evaluator ran)")
    p.add_argument("--fire-reset", action="store_true", help="Atari: press FIRE at each reset, as training does "
                   "(default: the protocol's eval.fire_reset, off)")
    p.add_argument("--video", help="write the first episode as an mp4 here")
    p.add_argument("--json", help="write the summary here")
    a = p.parse_args(argv)
    if not os.path.exists(a.checkpoint):
        raise C.ConfigError(f"checkpoint not found: {a.checkpoint}")
    theta, meta = load_params(a.checkpoint)
    cfg = C.from_dict(meta["config"])
    if a.env:
        cfg.env.name = a.env
    if a.epsilon is not None:
        cfg.eval.epsilon = a.epsilon
    if a.fire_reset:
        cfg.eval.fire_reset = True
    agent = agents.prepare(cfg)
    model = agent.make_network(cfg)
    layout = ParamLayout.from_module(model)
    if layout.hash != meta["layout_hash"]:
        raise C.ConfigError(f"checkpoint was trained on another network than {cfg.env.name} needs "
                            f"({layout.size} params vs {theta.size})")
    import torch
    torch.set_num_threads(a.threads or cfg.agent.torch_threads)
    layout.load_into(model, theta)
    model.eval()
    episodes = a.episodes or cfg.eval.episodes
    policy = agent.evaluation(cfg, model, a.seed)
    print(f"evaluating {a.checkpoint} on {cfg.env.name}: {episodes} episodes (seed {a.seed}), {policy.describe()}, up to "
          f"{cfg.eval.noop_max} no-ops, cap {cfg.eval.max_frames} frames"
          + (", FIRE pressed at reset" if protocol(cfg).get("fire_reset") else ""))
    returns = run_episodes(policy, cfg, episodes, a.seed, a.video,
                           on_episode=lambda i, r: print(f"  episode {i + 1}/{episodes}: {r:g}", flush=True))
    res = dict(summarize(cfg.env.name, returns), seed=a.seed, **protocol(cfg))
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
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
    from gorila_zmq.fields import UserError
    try:
        return int(getattr(importlib.import_module(mod), func)(argv[1:]) or 0)
    except UserError as e:
        # A wrong config, game name, argument or host: say what is wrong, not where (GORILA_DEBUG=1: traceback).
        if os.environ.get("GORILA_DEBUG"):
            raise
        print(f"gorila-zmq {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
