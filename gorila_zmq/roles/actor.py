"""The actor role: steps E environments together, acts with its replica of the network (batched
inference), and writes every transition to replay.

- DQN: epsilon-greedy on the Q-network, epsilon annealed on the *global* update count.
- DrQ-v2: uniform random actions for this actor's share of `agent.seed_frames`, then the actor's mean
  plus N(0, std^2) noise (clamped to [-1, 1]), std on `agent.std_schedule` over the global update count.

Parameters come from the background subscriber without blocking (after the first snapshot); epsilon
is annealed on the *global* update count (shard 0's version). Replay is the bundle's shared-memory
ring (bundled mode, this process owns it) or a global replay shard over ZeroMQ (global mode).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time

import numpy as np
import torch

from gorila_zmq.host import shm
from gorila_zmq.net import topology
from gorila_zmq.agents.dqn.agent import actor_epsilon
from gorila_zmq.agents.drqv2.agent import exploration_std
from gorila_zmq.ps.client import ParamSubscriber, ShardSet
from gorila_zmq.envs import make_vec_env, spec
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.agents.dqn.networks import build_model
from gorila_zmq.roles.base import Role, role_main

log = logging.getLogger("gorila_zmq.roles.actor")


def _stale(name: str):
    try:
        return shm.attach(name)
    except FileNotFoundError:
        return None


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
        self.spec = spec(cfg)
        self.model = build_model(cfg.model, cfg.run.seed)
        self.model.eval()
        self.layout = ParamLayout.from_module(self.model)
        self.sub = ParamSubscriber(self.ctx, ShardSet(cfg, self.layout))
        self._flat = np.empty(self.layout.size, np.float32)
        self._seen_updates = -1
        self.rng = np.random.default_rng([cfg.run.seed, 1, index])
        self.vec = make_vec_env(cfg, seed=cfg.run.seed * 100_003 + 1000 * index)
        E = self.vec.n
        if cfg.roles.mode == "bundled":
            from gorila_zmq.replay.memory import ReplayMemory
            # A predecessor killed with SIGKILL may have left the segment: this actor owns the name.
            shm.release(_stale(topology.bundle_replay_name(cfg, index)), unlink=True)
            self.replay = ReplayMemory(cfg.agent.replay_capacity, frame_shape=self.spec.frame_shape,
                                       stack=self.spec.stack, dtype=self.spec.dtype, n_step=cfg.agent.n_step,
                                       gamma=cfg.agent.gamma, lanes=E, name=topology.bundle_replay_name(cfg, index),
                                       action_shape=self.spec.action_shape, action_dtype=self.spec.action_dtype)
            self.lane0 = 0
        else:
            from gorila_zmq.roles.replay import ReplayWriter
            self.replay = ReplayWriter(self.ctx, cfg, index, self.spec)
            self.lane0 = 0
        self.state_path = os.path.join(cfg.run.run_dir, "state", f"{self.name}.json")
        st = self._load_state()
        self.env_frames = st.get("env_frames", 0)
        self.episodes = st.get("episodes", 0)
        self.steps = 0
        self.throttled_s = 0.0
        self.stall_steps = 0              # steps taken past the limiter because the learners stalled
        self.returns = collections.deque(maxlen=20)
        self.epsilon = cfg.agent.eps_start
        self.std = None
        self.seed_steps = 0               # DrQ-v2: steps taken with uniform random actions
        self.torch_gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + index)
        self.started = time.monotonic()
        if not self.sub.wait_ready(60):
            log.warning("%s: no parameters from the shards after 60 s; acting once they answer", self.name)
        self._refresh()
        self.updates_at_start: int | None = None      # the first global version seen: the limiter counts from it
        self._progress = (max(self.sub.global_version, 0), time.monotonic())   # last count seen to move, when
        self._throttled_since: float | None = None                     # over the limit since, or None
        obs, frames = self.vec.reset(seed=int(self.rng.integers(2**31)))
        self.obs = obs
        for e in range(E):
            self.replay.start_episode(frames[e], lane=self.lane0 + e)

    # -- state ----------------------------------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"env_frames": self.env_frames, "episodes": self.episodes}, f)
        os.replace(tmp, self.state_path)

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
            if hasattr(self.replay, "poll"):
                self.replay.poll()          # buffered transitions must still reach the replay shard
            return
        if self.steps % self.cfg.agent.actor_sync_every == 0:
            self._refresh()
        E = self.vec.n
        actions = self._continuous_actions() if self.spec.continuous else self._epsilon_greedy()
        res = self.vec.step(actions)
        for e in range(E):
            lane = self.lane0 + e
            a = actions[e] if self.spec.continuous else int(actions[e])
            self.replay.add(a, float(res.reward[e]), res.frames[e], bool(res.terminated[e]),
                            bool(res.truncated[e]), lane=lane)
            if e in res.reset_frames:
                self.replay.start_episode(res.reset_frames[e], lane=lane)
        self.obs = res.obs
        self.steps += 1
        self.env_frames += E * self.spec.frames_per_step
        for r in res.finished_returns:
            self.returns.append(r)
            self.episodes += 1
        if self.steps % 1000 == 0:
            self._save_state()
        if hasattr(self.replay, "poll"):
            self.replay.poll()

    def _epsilon_greedy(self) -> np.ndarray:
        self.epsilon = actor_epsilon(self.cfg.agent, max(self.sub.global_version, 0), self.index,
                                     num_actors(self.cfg))
        E = self.vec.n
        with torch.no_grad():
            greedy = self.model(torch.from_numpy(self.obs)).argmax(1).numpy()
        explore = self.rng.random(E) < self.epsilon
        return np.where(explore, self.rng.integers(self.spec.n_actions, size=E), greedy)

    def _continuous_actions(self) -> np.ndarray:
        """DrQ-v2: seed frames uniformly at random, then the policy mean plus scheduled noise."""
        E, a = self.vec.n, self.cfg.agent
        self.std = exploration_std(a.std_schedule, a.seed_frames, self.env_frames, num_actors(self.cfg),
                                   max(self.sub.global_version, 0))
        if self.std is None:
            self.seed_steps += 1
            return self.rng.uniform(-1.0, 1.0, (E, self.spec.n_actions)).astype(np.float32)
        return self.model.act(torch.from_numpy(self.obs), self.std, explore=True,
                              generator=self.torch_gen).numpy().astype(np.float32)

    def log_step(self) -> int:
        return self.env_frames

    def stats(self) -> dict:
        up = time.monotonic() - self.started
        return {"env_frames": self.env_frames, "agent_steps": self.steps, "episodes": self.episodes,
                "recent_return": float(np.mean(self.returns)) if self.returns else None,
                "epsilon": None if self.spec.continuous else self.epsilon, "exploration_std": self.std,
                "seed_steps": self.seed_steps,
                "global_updates": self.sub.global_version,
                "param_versions": self.sub.versions, "shards_alive": self.sub.alive,
                "steps_per_s": self.steps / up if up > 0 else 0.0, "uptime_s": up, "throttled_s": self.throttled_s,
                "stall_steps": self.stall_steps,
                "replay": self.replay.stats() if hasattr(self.replay, "stats") else {}}

    def close(self) -> None:
        try:
            self._save_state()
        finally:
            self.sub.close()
            self.vec.close()
            if hasattr(self.replay, "unlink"):
                self.replay.close()
                self.replay.unlink()
            else:
                self.replay.close()
            super().close()


def main(argv: list[str]) -> int:
    return role_main(argv, "actor", "Run one actor.", lambda cfg, i: Actor(cfg, i))
