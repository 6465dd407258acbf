"""DQN as Gorila trains it, behind the Agent protocol: epsilon-greedy acting with epsilon annealed on the
*global* update count, the TD loss against a target network theta^- synced from the parameter server
every `dqn.target_sync_every` *global* updates (Gorila 4.1), and the evaluation policy (epsilon
`eval.epsilon`, 0.05 in the Atari protocol)."""
from __future__ import annotations

import copy
import math

from typing import TYPE_CHECKING

import numpy as np

from gorila_zmq.agents.base import Agent, Batch, Clock, Learning, Policy
from gorila_zmq.agents.common import Every, linear_schedule
from gorila_zmq.fields import ConfigError
from gorila_zmq.replay import records

if TYPE_CHECKING:       # torch and the networks load with the first policy or network, not with the agent
    import torch


def actor_epsilon(dqn_cfg, global_updates: int, actor_index: int = 0, num_actors: int = 1) -> float:
    """Epsilon for an actor, annealed on the global update count. With `eps_per_actor`, actor i of N
    anneals to eps_end ** (1 + 7 i / (N - 1)) instead (the per-actor spread of Ape-X), an option."""
    end = dqn_cfg.eps_end
    if dqn_cfg.eps_per_actor and num_actors > 1:
        end = dqn_cfg.eps_end ** (1 + 7 * actor_index / (num_actors - 1))
    return linear_schedule(dqn_cfg.eps_start, end, dqn_cfg.eps_anneal_updates, global_updates)


class EpsilonGreedy(Policy):
    """Greedy on the Q-network with probability 1 - epsilon, else a uniformly random action. `epsilon`
    is a number, or a function of the clock (an actor's annealing)."""

    def __init__(self, net, n_actions: int, epsilon, rng: np.random.Generator, keep_q: bool = False):
        self.net, self.n_actions, self.rng, self.keep_q = net, n_actions, rng, keep_q
        self._epsilon = epsilon if callable(epsilon) else (lambda clock, e=float(epsilon): e)
        self.epsilon = None

    def act(self, obs: np.ndarray, clock: Clock) -> np.ndarray:
        self.epsilon = self._epsilon(clock)
        E = len(obs)
        explore = self.rng.random(E) < self.epsilon
        random = self.rng.integers(self.n_actions, size=E)
        if explore.all() and not self.keep_q:    # no forward pass when no greedy action is used
            return random
        import torch
        with torch.no_grad():
            q = self.net(torch.from_numpy(np.asarray(obs))).numpy()
        if self.keep_q:
            self.q_values = q
        return np.where(explore, random, q.argmax(1))

    def stats(self) -> dict:
        return {"epsilon": self.epsilon}

    def describe(self) -> str:
        return f"epsilon-greedy on the Q-network, epsilon {self._epsilon(Clock()):g}"


class DQNLearning(Learning):
    def __init__(self, cfg, online, load_theta, global_updates: int):
        self.cfg, self.online, self.load_theta = cfg, online, load_theta
        self.target = copy.deepcopy(online).requires_grad_(False)
        self.target_syncs = 0
        self.sync_target()
        self.every = Every(cfg.dqn.target_sync_every, max(global_updates, 0))

    def sync_target(self) -> None:
        self.load_theta(self.target)
        self.target_syncs += 1

    def gradients(self, batch: Batch, global_updates: int, accept) -> tuple[dict, bool]:
        from gorila_zmq.agents.dqn.learning import td_loss
        d = self.cfg.dqn
        loss, info = td_loss(self.online, self.target, batch.obs, batch.action.long(), batch.reward,
                             batch.discount, batch.next_obs, double=d.double_dqn, huber=d.huber,
                             weight=batch.weight)
        if not accept(info["loss"]):
            return info, False
        self.online.zero_grad(set_to_none=False)    # in place: on the CPU .grad is the push buffer
        loss.backward()
        return info, True

    def after_update(self, global_updates: int) -> None:
        if self.every(global_updates):
            self.sync_target()

    def stats(self) -> dict:
        return {"target_syncs": self.target_syncs}


class DQN(Agent):
    name = "dqn"
    prioritized_replay = True

    def configure(self, cfg, env) -> None:
        if env.continuous:
            raise ConfigError(f"agent dqn needs discrete actions; {cfg.env.name} has continuous actions "
                              "(use --agent drqv2)")
        if cfg.model.kind == "auto":
            cfg.model.kind = "nature_cnn" if env.atari else "mlp"
        if cfg.model.kind not in ("nature_cnn", "mlp"):
            raise ConfigError(f"model.kind {cfg.model.kind!r} does not fit agent dqn (nature_cnn or mlp)")
        if cfg.model.kind == "nature_cnn" and not env.atari:
            raise ConfigError(f"model.kind nature_cnn needs Atari frames; {cfg.env.name} has observations "
                              f"{env.obs_shape}")
        cfg.model.obs_shape, cfg.model.n_actions, cfg.model.action_dim = list(env.obs_shape), env.n_actions, 0

    def network(self, cfg) -> torch.nn.Module:
        from gorila_zmq.agents.dqn.networks import MLP, NatureCNN
        m = cfg.model
        if m.kind == "nature_cnn":
            return NatureCNN(tuple(m.obs_shape), m.n_actions)
        return MLP(int(math.prod(m.obs_shape)), m.n_actions, tuple(m.hidden))

    def record(self, env) -> records.Record:
        return records.discrete(env, env.n_actions)

    def behaviour(self, cfg, net, index: int, num_actors: int) -> Policy:
        return EpsilonGreedy(net, cfg.model.n_actions,
                             lambda clock: actor_epsilon(cfg.dqn, clock.global_updates, index, num_actors),
                             np.random.default_rng([cfg.run.seed, 1, index]), keep_q=cfg.agent.actor_priorities)

    def evaluation(self, cfg, net, seed: int) -> Policy:
        return EpsilonGreedy(net, cfg.model.n_actions, cfg.eval.epsilon, np.random.default_rng(seed))

    def learning(self, cfg, online, load_theta, global_updates: int = 0) -> Learning:
        return DQNLearning(cfg, online, load_theta, global_updates)
