"""The evaluator role, and the evaluation protocol it shares with `gorila-zmq eval`.

Every `eval.interval_s` the evaluator takes the exact current theta from the shards, plays
`eval.episodes` whole episodes with the agent's evaluation policy (DQN: epsilon `eval.epsilon`;
DrQ-v2: the mean action), appends the result to RUN_DIR/evaluations.jsonl and keeps the best
parameters as RUN_DIR/best.npz. A resumed run's evaluator goes on from RUN_DIR/state/evaluator.json:
its count of evaluations (so seeds are not reused) and `run_seconds`, the time the run has been up
summed over its starts (written at each evaluation and at a clean stop), which each record carries
beside its `wall_time` so a curve against time leaves out the hours a run was stopped. Each record
names its seed: `gorila-zmq eval --checkpoint RUN_DIR/best.npz --seed SEED` plays the same episodes
again (on `agent.torch_threads` threads, as the evaluator does), and on a deterministic environment
gets the same returns.

Atari protocol (DQN/Gorila): no sticky actions, up to `eval.noop_max` random no-ops at the start and
no FIRE pressed for the agent (`eval.fire_reset`, recorded in each evaluation as `fire_reset`),
epsilon 0.05, episodes capped at `eval.max_frames` emulator frames (18,000 = 5 minutes), 30
episodes; raw rewards, whole games (no life-loss terminals); scores human-normalised (envs/scores.py).
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from gorila_zmq import config as C
from gorila_zmq.agents import base as agents
from gorila_zmq.envs import make_env, screen
from gorila_zmq.envs.scores import summarize
from gorila_zmq.host.files import atomic_write, write_json
from gorila_zmq.net import topology
from gorila_zmq.ps.client import ShardSet, fetch_params
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.roles.base import Role, role_main

log = logging.getLogger("gorila_zmq.evaluator")


def run_episodes(policy: agents.Policy, cfg, episodes: int, seed: int = 0, video_path: str | None = None,
                 on_episode=None, should_stop=None) -> list[float]:
    """Play `episodes` whole episodes with the evaluation protocol; their raw returns (fewer if
    `should_stop()` turns true: a role asked to stop does not finish a long evaluation first)."""
    env = make_env(cfg, evaluation=True, seed=seed)
    rng = np.random.default_rng(seed)
    writer = None
    returns = []
    clock = agents.Clock()
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
                a = policy.act(np.asarray(obs)[None], clock)[0]
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


def protocol(cfg) -> dict:
    """What an evaluation record says about how it was played (beside its returns)."""
    out = {"epsilon": cfg.eval.epsilon, "noop_max": cfg.eval.noop_max, "max_frames": cfg.eval.max_frames}
    from gorila_zmq.envs import is_atari
    if is_atari(cfg.env.name):
        out["fire_reset"] = bool(cfg.eval.fire_reset)
    return out


def _video_frame(writer, env, path: str):
    """Append the current screen (RGB) to an mp4 (opencv), opening the writer on first use."""
    import cv2
    frame = screen(env)
    if frame is None:
        return writer                      # vector-observation tasks have no screen to record
    if writer is None:
        h, w = frame.shape[:2]
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 15, (w, h))
    writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return writer


def save_params(path: str, theta: np.ndarray, layout: ParamLayout, cfg, meta: dict) -> None:
    """An evaluation checkpoint: theta + layout hash + the resolved config (npz, no pickle)."""
    body = dict(meta, layout_hash=layout.hash, config=C.to_dict(cfg))
    with atomic_write(path) as f:
        np.savez(f, theta=theta, meta=np.frombuffer(json.dumps(body).encode(), np.uint8))


def load_params(path: str) -> tuple[np.ndarray, dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            theta, meta = z["theta"].astype(np.float32), json.loads(z["meta"].tobytes().decode())
    except Exception as e:  # a truncated file, another format, a shard checkpoint ...
        raise C.ConfigError(f"{path} is not a readable evaluation checkpoint ({type(e).__name__}: {e})") from None
    if "config" not in meta or "layout_hash" not in meta:
        raise C.ConfigError(f"{path} is not an evaluation checkpoint (RUN_DIR/best.npz): no config in it")
    return theta, meta


class Evaluator(Role):
    name = "evaluator"

    def __init__(self, cfg, index: int = 0, ctx=None):
        super().__init__(cfg, ctx, topology.control(cfg, "evaluator", index))
        self.agent = agents.prepare(cfg)
        self.model = self.agent.make_network(cfg)
        self.layout = ParamLayout.from_module(self.model)
        self.shards = ShardSet(cfg, self.layout)
        self.best_path = os.path.join(cfg.run.run_dir, "best.npz")
        self.history_path = os.path.join(cfg.run.run_dir, "evaluations.jsonl")
        self.best = -float("inf")
        if os.path.exists(self.best_path):
            try:
                self.best = load_params(self.best_path)[1].get("return_mean", self.best)
            except ValueError as e:
                log.warning("evaluator: %s; its score is not kept as the best", e)
        self.last: dict = {}
        self.state_path = os.path.join(cfg.run.run_dir, "state", "evaluator.json")
        self.evaluations, self._up_before = self._load_state()   # _up_before: over the earlier starts
        self._started = time.monotonic()
        self._next = time.monotonic() + min(cfg.eval.interval_s, 5.0)

    def _load_state(self) -> tuple[int, float]:
        try:
            with open(self.state_path) as f:
                state = json.load(f)
            n, up = int(state.get("evaluations", 0)), float(state.get("run_seconds", 0.0))
            if n < 0 or not up >= 0:
                raise ValueError(f"evaluations {n}, run_seconds {up}")
            return n, up
        except FileNotFoundError:
            return 0, 0.0
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning("evaluator: %s is unreadable (%s: %s); counting evaluations and run time from 0",
                        self.state_path, type(e).__name__, e)
            return 0, 0.0

    def run_seconds(self) -> float:
        """Seconds this run's evaluator has been up, over every start of the run."""
        return self._up_before + time.monotonic() - self._started

    def _save_state(self) -> None:
        write_json(self.state_path, {"evaluations": self.evaluations, "run_seconds": round(self.run_seconds(), 3)})

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
        seed = self.cfg.run.seed + 7919 * (self.evaluations + 1)
        returns = run_episodes(self.agent.evaluation(self.cfg, self.model, seed), self.cfg, self.cfg.eval.episodes,
                               seed=seed, should_stop=lambda: self._stop)
        if self._stop:
            return
        res = summarize(self.cfg.env.name, returns)
        res.update(global_updates=versions[0], wall_time=time.time(), run_seconds=round(self.run_seconds(), 3),
                   eval_seconds=time.monotonic() - t0, env_frames=self._env_frames(), seed=seed,
                   **protocol(self.cfg))
        self.last = res
        self.evaluations += 1
        with open(self.history_path, "a") as f:     # one line per evaluation, appended: a log, not state
            f.write(json.dumps(res) + "\n")
        self._save_state()
        self.scalars.log(versions[0], {k: v for k, v in res.items() if k.startswith(("return", "human"))})
        log.info("evaluation %d at %d global updates: mean return %.2f%s", self.evaluations, versions[0],
                 res["return_mean"], f" ({res['human_normalized']:.1f}% human)" if res.get("human_normalized")
                 is not None else "")
        if res["return_mean"] > self.best:
            self.best = res["return_mean"]
            save_params(self.best_path, theta, self.layout, self.cfg, res)

    def finish(self) -> None:
        self._save_state()

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
