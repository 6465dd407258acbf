"""Evaluation: the null-op-starts protocol (DQN/Gorila), human-normalised scores, the evaluator role
and `gorila-zmq eval`.

DrQ-v2 (continuous actions): the policy's mean action (no noise), `eval.episodes` whole episodes
(10 in the drqv2 preset, as the paper reports), the mean return.

Atari protocol: no sticky actions, up to `eval.noop_max` random no-ops at the start, epsilon
`eval.epsilon` (0.05), episodes capped at `eval.max_frames` emulator frames (18,000 = 5 minutes),
`eval.episodes` episodes (30); raw rewards, whole games (no life-loss terminals).

Human-normalised score = 100 * (agent - random) / (human - random). For the 49 games of the DQN Nature
paper (Mnih et al. 2015, Extended Data Table 2: random play and the professional human tester) its
scores, to one decimal (gorila_zmq/data/nature_dqn_random_human.csv; Pong: -20.7 and 9.3); for the
other ALE games, the table DeepMind published with DQN Zoo (atari_random_human.csv), whose human
scores differ from the Nature paper's for 34 of the 49. Each result names the table it used.
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import time
from importlib import resources

import numpy as np
import torch

from gorila_zmq import config as C
from gorila_zmq.net import topology
from gorila_zmq.ps.client import ShardSet, fetch_params
from gorila_zmq.envs import is_atari, make_env, resolve_model
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.agents.dqn.networks import build_model
from gorila_zmq.roles.base import Role, role_main

log = logging.getLogger("gorila_zmq.roles.evaluator")
NATURE_TABLE = "DQN Nature paper, Extended Data Table 2 (nature_dqn_random_human.csv)"
ZOO_TABLE = "DQN Zoo random/human scores (atari_random_human.csv)"


def _norm_key(game: str) -> str:
    from gorila_zmq.envs.atari import UnknownGameError, resolve_game
    try:
        game = resolve_game(game)           # PongNoFrameskip-v4, ALE/Pong-v5, space_invaders ... -> the ROM id
    except UnknownGameError:
        pass
    return game.split("/")[-1].split("-")[0].replace("_", "").lower()


@functools.lru_cache(maxsize=None)
def _read_table(name: str) -> dict[str, tuple[float, float]]:
    with resources.files("gorila_zmq.data").joinpath(name).open() as f:
        return {row["game"].replace("_", "").lower(): (float(row["random"]), float(row["human"]))
                for row in csv.DictReader(f)}


def normalization_table(game: str) -> tuple[str, float, float] | None:
    """(table name, random, human) for an ALE game: the Nature paper's for its 49, else DQN Zoo's."""
    key = _norm_key(game)
    for name, path in ((NATURE_TABLE, "nature_dqn_random_human.csv"), (ZOO_TABLE, "atari_random_human.csv")):
        rh = _read_table(path).get(key)
        if rh is not None:
            return name, rh[0], rh[1]
    return None


def human_normalized(game: str, score: float) -> float | None:
    t = normalization_table(game)
    if t is None:
        return None
    _, rnd, human = t
    return 100.0 * (score - rnd) / (human - rnd)


def run_episodes(model, cfg, episodes: int, epsilon: float, seed: int = 0, video_path: str | None = None,
                 on_episode=None, should_stop=None) -> list[float]:
    """Play `episodes` whole episodes with the evaluation protocol; their raw returns (fewer if
    `should_stop()` turns true: a role asked to stop does not finish a long evaluation first)."""
    env = make_env(cfg, evaluation=True, seed=seed)
    rng = np.random.default_rng(seed)
    continuous = not hasattr(env.action_space, "n")
    n_actions = None if continuous else env.action_space.n
    writer = None
    returns = []
    model.eval()
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            total, done = 0.0, False
            record = video_path is not None and ep == 0
            while not done:
                if should_stop is not None and should_stop():
                    return returns
                if record:
                    writer = _video_frame(writer, env, video_path)
                if continuous:                   # DrQ-v2: the deterministic (mean) action
                    a = model.act(torch.as_tensor(np.asarray(obs)[None]), 0.0, explore=False)[0].numpy()
                elif rng.random() < epsilon:
                    a = int(rng.integers(n_actions))
                else:
                    with torch.no_grad():
                        a = int(model(torch.as_tensor(np.asarray(obs)[None])).argmax(1).item())
                obs, r, term, trunc, info = env.step(a)
                total += info.get("raw_reward", r)
                done = term or trunc
            returns.append(total)
            if on_episode:
                on_episode(ep, total)
    finally:
        if writer is not None:
            writer.release()
        env.close()
    return returns


def _video_frame(writer, env, path: str):
    """Append the current screen (RGB) to an mp4 (opencv), opening the writer on first use."""
    import cv2
    if hasattr(env, "ale"):
        frame = env.ale.getScreenRGB()
    elif hasattr(env, "last_frame") and env.last_frame.ndim == 3:      # DeepMind Control: (3, H, W) RGB
        frame = np.ascontiguousarray(env.last_frame.transpose(1, 2, 0))
    else:
        return writer                      # vector-observation tasks have no screen to record
    if writer is None:
        h, w = frame.shape[:2]
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 15, (w, h))
    writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return writer


def summarize(game: str, returns: list[float]) -> dict:
    mean = float(np.mean(returns)) if returns else float("nan")
    out = {"episodes": len(returns), "return_mean": mean,
           "return_median": float(np.median(returns)) if returns else float("nan"),
           "return_min": float(np.min(returns)) if returns else float("nan"),
           "return_max": float(np.max(returns)) if returns else float("nan")}
    if is_atari(game):
        out["human_normalized"] = human_normalized(game, mean)
        out["normalization_table"] = normalization_table(game)[0] if out["human_normalized"] is not None else None
    return out


def save_params(path: str, theta: np.ndarray, layout: ParamLayout, cfg, meta: dict) -> None:
    """An evaluation checkpoint: theta + layout hash + the resolved config (npz, no pickle)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    body = dict(meta, layout_hash=layout.hash, config=C.to_dict(cfg))
    tmp = path + ".tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, theta=theta, meta=np.frombuffer(json.dumps(body).encode(), np.uint8))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_params(path: str) -> tuple[np.ndarray, dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            theta, meta = z["theta"].astype(np.float32), json.loads(z["meta"].tobytes().decode())
    except Exception as e:  # a truncated file, another format, a shard checkpoint ...
        raise ValueError(f"{path} is not a readable evaluation checkpoint ({type(e).__name__}: {e})") from None
    if "config" not in meta or "layout_hash" not in meta:
        raise ValueError(f"{path} is not an evaluation checkpoint (RUN_DIR/best.npz): no config in it")
    return theta, meta


class Evaluator(Role):
    name = "evaluator"

    def __init__(self, cfg, index: int = 0, ctx=None):
        super().__init__(cfg, ctx, topology.control(cfg, "evaluator", index))
        self.model = build_model(cfg.model, cfg.run.seed)
        self.layout = ParamLayout.from_module(self.model)
        self.shards = ShardSet(cfg, self.layout)
        self.best_path = os.path.join(cfg.run.run_dir, "best.npz")
        self.history_path = os.path.join(cfg.run.run_dir, "evaluations.jsonl")
        self.best = -float("inf")
        if os.path.exists(self.best_path):
            try:
                self.best = load_params(self.best_path)[1].get("return_mean", self.best)
            except Exception:
                pass
        self.last: dict = {}
        self.evaluations = 0
        self._next = time.monotonic() + min(cfg.eval.interval_s, 5.0)

    def step(self) -> None:
        if time.monotonic() < self._next:
            time.sleep(0.05)
            return
        self._next = time.monotonic() + self.cfg.eval.interval_s
        try:
            theta, versions = fetch_params(self.ctx, self.shards)
        except Exception as e:
            log.warning("evaluator: cannot fetch parameters (%s); retrying next interval", e)
            return
        self.layout.load_into(self.model, theta)
        t0 = time.monotonic()
        returns = run_episodes(self.model, self.cfg, self.cfg.eval.episodes, self.cfg.eval.epsilon,
                               seed=self.cfg.run.seed + 7919 * (self.evaluations + 1),
                               should_stop=lambda: self._stop)
        if self._stop:
            return
        res = summarize(self.cfg.env.name, returns)
        res.update(global_updates=versions[0], wall_time=time.time(), eval_seconds=time.monotonic() - t0,
                   env_frames=self._env_frames())
        self.last = res
        self.evaluations += 1
        with open(self.history_path, "a") as f:
            f.write(json.dumps(res) + "\n")
        self.scalars.log(versions[0], {k: v for k, v in res.items() if k.startswith(("return", "human"))})
        log.info("evaluation %d at %d global updates: mean return %.2f%s", self.evaluations, versions[0],
                 res["return_mean"], f" ({res['human_normalized']:.1f}% human)" if res.get("human_normalized")
                 is not None else "")
        if res["return_mean"] > self.best:
            self.best = res["return_mean"]
            save_params(self.best_path, theta, self.layout, self.cfg, res)

    def _env_frames(self) -> int:
        total = 0
        for path in _state_files(self.cfg.run.run_dir, "actor"):
            try:
                total += json.load(open(path)).get("env_frames", 0)
            except (OSError, ValueError):
                pass
        return total

    def stats(self) -> dict:
        return {"evaluations": self.evaluations, "best_return": self.best if self.evaluations or
                self.best > -float("inf") else None, "last": self.last}


def _state_files(run_dir: str, prefix: str) -> list[str]:
    d = os.path.join(run_dir, "state")
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.startswith(prefix)] if os.path.isdir(d) else []


def evaluator_main(argv: list[str]) -> int:
    return role_main(argv, "evaluator", "Run the evaluator role.", lambda cfg, i: Evaluator(cfg, i),
                     index_required=False)


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq eval",
                                description="Evaluate saved parameters with the null-op-starts protocol.")
    p.add_argument("--checkpoint", required=True, help="an evaluation checkpoint (run_dir/best.npz)")
    p.add_argument("--env", help="game or gymnasium id (default: the one the checkpoint was trained on)")
    p.add_argument("--episodes", type=int, default=None, help="default: eval.episodes (30)")
    p.add_argument("--epsilon", type=float, default=None, help="default: eval.epsilon (0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video", help="write the first episode as an mp4 here")
    p.add_argument("--json", help="write the summary here")
    a = p.parse_args(argv)
    if not os.path.exists(a.checkpoint):
        raise C.ConfigError(f"checkpoint not found: {a.checkpoint}")
    theta, meta = load_params(a.checkpoint)
    cfg = C.from_dict(meta["config"])
    if a.env:
        cfg.env.name = a.env
    resolve_model(cfg)
    model = build_model(cfg.model)
    layout = ParamLayout.from_module(model)
    if layout.hash != meta["layout_hash"]:
        raise C.ConfigError(f"checkpoint was trained on another network than {cfg.env.name} needs "
                            f"({layout.size} params vs {theta.size})")
    layout.load_into(model, theta)
    episodes = a.episodes or cfg.eval.episodes
    eps = cfg.eval.epsilon if a.epsilon is None else a.epsilon
    if cfg.agent.name == "drqv2":
        print(f"evaluating {a.checkpoint} on {cfg.env.name}: {episodes} episodes, the policy's mean action")
    else:
        print(f"evaluating {a.checkpoint} on {cfg.env.name}: {episodes} episodes, epsilon {eps}, "
              f"up to {cfg.eval.noop_max} no-ops, cap {cfg.eval.max_frames} frames")
    returns = run_episodes(model, cfg, episodes, eps, a.seed, a.video,
                           on_episode=lambda i, r: print(f"  episode {i + 1}/{episodes}: {r:g}", flush=True))
    res = summarize(cfg.env.name, returns)
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
