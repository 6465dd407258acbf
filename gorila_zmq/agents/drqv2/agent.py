"""DrQ-v2 behind the Agent protocol: uniform random actions for an actor's share of `drqv2.seed_frames`,
then the actor's mean plus N(0, std^2) noise (clamped to [-1, 1]) with std on `drqv2.std_schedule` over
the global update count; the evaluation policy is the mean action. The learner's critic target is its
own, starting from the parameter server's critic and soft-updated (tau) after every update."""
from __future__ import annotations

import copy

from typing import TYPE_CHECKING

import numpy as np

from gorila_zmq.agents.base import Agent, Batch, Clock, Learning, Policy
from gorila_zmq.agents.common import schedule
from gorila_zmq.fields import ConfigError
from gorila_zmq.replay import records

if TYPE_CHECKING:       # torch and the networks load with the first policy or network, not with the agent
    import torch


def exploration_std(std_schedule: str, seed_frames: int, actor_frames: int, num_actors: int,
                    global_updates: int) -> float | None:
    """An actor's exploration: None (uniform random actions) while its own frames are within its share
    of the seed frames, else the scheduled std on the global update count."""
    if actor_frames < seed_frames / max(num_actors, 1):
        return None
    return schedule(std_schedule, global_updates)


class Exploring(Policy):
    """An actor's policy: seed frames uniformly at random, then the mean plus scheduled noise."""

    def __init__(self, cfg, net, index: int, num_actors: int):
        self.cfg, self.net, self.num_actors = cfg.drqv2, net, num_actors
        self.action_dim = cfg.model.action_dim
        self.rng = np.random.default_rng([cfg.run.seed, 1, index])
        import torch
        self.gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + index)
        self.std = None
        self.seed_steps = 0

    def act(self, obs: np.ndarray, clock: Clock) -> np.ndarray:
        c = self.cfg
        self.std = exploration_std(c.std_schedule, c.seed_frames, clock.env_frames, self.num_actors,
                                   clock.global_updates)
        if self.std is None:
            self.seed_steps += 1
            return self.rng.uniform(-1.0, 1.0, (len(obs), self.action_dim)).astype(np.float32)
        import torch
        return self.net.act(torch.from_numpy(np.asarray(obs)), self.std, explore=True,
                            generator=self.gen).numpy().astype(np.float32)

    def stats(self) -> dict:
        return {"exploration_std": self.std, "seed_steps": self.seed_steps}


class MeanAction(Policy):
    """The evaluation policy: the actor's mean action, no noise."""

    def __init__(self, net):
        self.net = net

    def act(self, obs: np.ndarray, clock: Clock) -> np.ndarray:
        import torch
        return self.net.act(torch.as_tensor(np.asarray(obs)), 0.0, explore=False).numpy().astype(np.float32)

    def describe(self) -> str:
        return "the policy's mean action"


class DrQv2Learning(Learning):
    def __init__(self, cfg, online, load_theta):
        self.cfg, self.online = cfg, online
        start = copy.deepcopy(online).requires_grad_(False)
        load_theta(start)                       # the parameter server's critic, not this process's init
        self.critic_target = start.critic

    def gradients(self, batch: Batch, global_updates: int, accept) -> tuple[dict, bool]:
        from gorila_zmq.agents.drqv2.learning import gradients
        d = self.cfg.drqv2
        std = schedule(d.std_schedule, max(global_updates, 0))
        info, ok = gradients(self.online, self.critic_target, batch.obs, batch.action.float(), batch.reward,
                             batch.discount, batch.next_obs, std, d.std_clip, accept=accept,
                             pretanh_reg=d.actor_pretanh_reg)
        return {"loss": info["critic_loss"], "q_mean": info["critic_q1"], "exploration_std": std, **info}, ok

    def after_update(self, global_updates: int) -> None:
        from gorila_zmq.agents.drqv2.learning import soft_update
        soft_update(self.critic_target, self.online.critic, self.cfg.drqv2.critic_tau)


class DrQv2(Agent):
    name = "drqv2"

    def configure(self, cfg, env) -> None:
        if not env.continuous:
            raise ConfigError(f"agent drqv2 needs continuous actions (a DeepMind Control task such as "
                              f"cartpole_swingup); {cfg.env.name} has {env.n_actions} discrete actions")
        if cfg.model.kind == "auto":
            cfg.model.kind = "drqv2"
        if cfg.model.kind != "drqv2":
            raise ConfigError(f"model.kind {cfg.model.kind} does not fit agent drqv2 (drqv2)")
        cfg.model.obs_shape, cfg.model.n_actions, cfg.model.action_dim = list(env.obs_shape), 0, env.action_dim

    def network(self, cfg) -> torch.nn.Module:
        from gorila_zmq.agents.drqv2.networks import DrQV2
        m = cfg.model
        return DrQV2(tuple(m.obs_shape), m.action_dim, m.feature_dim, int(m.hidden[0]))

    def record(self, env) -> records.Record:
        # As the paper's code: a stack at an episode's start repeats its first frame (DMCEnv does the
        # same for the actor), and only whole n-step windows are drawn, never the last n - 1 steps
        # before a time limit (DrQ-v2's replay samples idx <= len - nstep).
        return records.continuous(env, env.action_dim, stack_padding="repeat", full_windows=True)

    def behaviour(self, cfg, net, index: int, num_actors: int) -> Policy:
        return Exploring(cfg, net, index, num_actors)

    def evaluation(self, cfg, net, seed: int) -> Policy:
        return MeanAction(net)

    def learning(self, cfg, online, load_theta, global_updates: int = 0) -> Learning:
        return DrQv2Learning(cfg, online, load_theta)
