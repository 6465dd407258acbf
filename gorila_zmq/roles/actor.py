"""The actor role: steps E environments together, acts with its replica of the agent's network (the
agent's behaviour policy, batched over the E observations), and writes every transition to replay.

Parameters come from the background subscriber without blocking (after the first snapshot); the
policy schedules on the *global* update count (shard 0's version) and this actor's own frames. Replay
is the bundle's shared-memory ring (bundled mode, this process owns it) or a global replay shard over
ZeroMQ (global mode): replay/sinks.py. A replay-ratio limiter (agent.max_steps_per_update) pauses the
actor while it is ahead of the learners.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time

import numpy as np

from gorila_zmq.agents import base as agents
from gorila_zmq.envs import env_spec, make_vec_env
from gorila_zmq.host.files import write_json
from gorila_zmq.ps.client import ShardSet
from gorila_zmq.ps.shared import param_source
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.net import topology
from gorila_zmq.replay.sinks import make_sink
from gorila_zmq.roles.base import Role, role_main

log = logging.getLogger("gorila_zmq.actor")


def num_actors(cfg) -> int:
    return cfg.roles.bundles if cfg.roles.mode == "bundled" else cfg.roles.actors


def allowed_transitions(cfg, global_updates: int) -> float | None:
    """Replay-ratio limiter (agent.max_steps_per_update; None: off): the transitions one actor may have
    written by now. Its share of learning_starts (a bundle's replay needs all of them; global replay
    needs them from all actors together), then its share of ratio x global updates."""
    ratio = cfg.agent.max_steps_per_update
    if ratio <= 0:
        return None
    n = num_actors(cfg)
    start = cfg.agent.learning_starts if cfg.roles.mode == "bundled" else -(-cfg.agent.learning_starts // n)
    return start + ratio * global_updates / n


class Actor(Role):
    def __init__(self, cfg, index: int, ctx=None):
        self.name = f"actor{index}"
        super().__init__(cfg, ctx, topology.control(cfg, "actor", index))
        self.index = index
        agent = agents.prepare(cfg)
        self.env = env_spec(cfg)
        self.model = agent.make_network(cfg)
        self.model.eval()
        self.policy = agent.behaviour(cfg, self.model, index, num_actors(cfg))
        self.layout = ParamLayout.from_module(self.model)
        self.sub = param_source(self.ctx, ShardSet(cfg, self.layout), cfg, self.name)
        self._flat = np.empty(self.layout.size, np.float32)
        self._seen_updates = -1
        self.rng = np.random.default_rng([cfg.run.seed, 1, index])
        self.vec = make_vec_env(cfg, seed=cfg.run.seed * 100_003 + 1000 * index)
        self.replay = make_sink(self.ctx, cfg, index, agent.record(self.env))
        self.stamp = cfg.agent.actor_priorities
        self.state_path = os.path.join(cfg.run.run_dir, "state", f"{self.name}.json")
        st = self._load_state()
        self.env_frames = st.get("env_frames", 0)
        self.episodes = st.get("episodes", 0)
        self.steps = 0
        self.throttled_s = 0.0
        self.stall_steps = 0              # steps taken past the limiter because the learners stalled
        self.returns = collections.deque(maxlen=20)
        self.started = time.monotonic()
        if not self.sub.wait_ready(60):
            log.warning("%s: no parameters from the shards after 60 s; acting once they answer", self.name)
        self._refresh()
        self.updates_at_start: int | None = None      # the first global version seen: the limiter counts from it
        self._progress = (max(self.sub.global_version, 0), time.monotonic())   # last count seen to move, when
        self._throttled_since: float | None = None                     # over the limit since, or None
        self.obs, frames = self.vec.reset(seed=int(self.rng.integers(2**31)))
        for e in range(self.vec.n):
            self.replay.start_episode(frames[e], lane=e)

    # -- state ----------------------------------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        write_json(self.state_path, {"env_frames": self.env_frames, "episodes": self.episodes})

    # -- acting ---------------------------------------------------------------------------------
    def _refresh(self) -> None:
        if self.sub.updates != self._seen_updates and self.sub.global_version >= 0:
            _, _, self._seen_updates = self.sub.latest(self._flat)
            self.layout.load_into(self.model, self._flat)

    def _throttled(self) -> bool:
        # Counted from this process's start, on both sides: a restarted or resumed actor refills its
        # share of learning_starts (its replay may be new and empty), then keeps pace with the
        # updates made since, instead of running ahead by every update made before it started.
        v, now = self.sub.global_version, time.monotonic()      # read once: the subscriber thread moves it
        g = max(v, 0)
        if self.updates_at_start is None and v >= 0:
            self.updates_at_start = v       # also when the shards answered only after the start-up wait
        if g != self._progress[0]:
            self._progress = (g, now)
        allowed = allowed_transitions(self.cfg, 0 if self.updates_at_start is None else g - self.updates_at_start)
        if allowed is None or self.steps * self.vec.n <= allowed:
            self._throttled_since = None
            return False
        if self._throttled_since is None:
            self._throttled_since = now
        # Over the limit, and waiting. If no update has happened for limiter_stall_s of that wait, the
        # learners are starved (a replay shard restarted empty cannot serve a batch until actors
        # refill it): step anyway, until the count moves again.
        if now - max(self._progress[1], self._throttled_since) > self.cfg.agent.limiter_stall_s:
            self.stall_steps += 1
            return False
        return True

    def step(self) -> None:
        if self._throttled():
            self.throttled_s += 0.005
            time.sleep(0.005)
            self.replay.poll()              # buffered transitions must still reach the replay shard
            return
        if self.steps % self.cfg.agent.actor_sync_every == 0:
            self._refresh()
        clock = agents.Clock(max(self.sub.global_version, 0), self.env_frames)
        actions = self.policy.act(self.obs, clock)
        if self.stamp:                      # Ape-X: the values just computed give earlier steps their priority
            self.replay.observe(self.policy.q_values, actions)
        res = self.vec.step(actions)
        for e in range(self.vec.n):
            self.replay.add(actions[e], float(res.reward[e]), res.frames[e], bool(res.terminated[e]),
                            bool(res.truncated[e]), lane=e)
            if e in res.reset_frames:
                self.replay.start_episode(res.reset_frames[e], lane=e)
        self.obs = res.obs
        self.steps += 1
        self.env_frames += self.vec.n * self.env.frames_per_step
        for r in res.finished_returns:
            self.returns.append(r)
            self.episodes += 1
        if self.steps % 1000 == 0:
            self._save_state()
        self.replay.poll()

    def log_step(self) -> int:
        return self.env_frames

    def stats(self) -> dict:
        up = time.monotonic() - self.started
        return {"env_frames": self.env_frames, "agent_steps": self.steps, "episodes": self.episodes,
                "recent_return": float(np.mean(self.returns)) if self.returns else None,
                **self.policy.stats(), "global_updates": self.sub.global_version,
                "param_versions": self.sub.versions, "shards_alive": self.sub.alive,
                "steps_per_s": self.steps / up if up > 0 else 0.0, "uptime_s": up, "throttled_s": self.throttled_s,
                "stall_steps": self.stall_steps, "replay": self.replay.stats()}

    def close(self) -> None:
        try:
            self._save_state()
        finally:
            self.sub.close()
            self.vec.close()
            self.replay.close()
            super().close()


def main(argv: list[str]) -> int:
    return role_main(argv, "actor", "Run one actor.", lambda cfg, i: Actor(cfg, i))
