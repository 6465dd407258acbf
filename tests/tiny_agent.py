"""A third agent that lives only here, to show that an agent is a package behind the Agent protocol and
that no role needs an edit for it: `agent.name=tiny_agent:TinyAgent` with tests/ on PYTHONPATH.

It differs from DQN wherever the interface lets it: a linear network, softmax (Boltzmann) acting,
argmax evaluation, a one-step TD loss without a target network, and int32 actions in replay. Its
policies and learning report counters of their own, which the test reads back through every role."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from gorila_zmq.agents.base import Agent, Learning, Policy
from gorila_zmq.fields import ConfigError
from gorila_zmq.replay.records import Record


class Linear(torch.nn.Module):
    def __init__(self, obs_dim: int, n_actions: int):
        super().__init__()
        self.q = torch.nn.Linear(obs_dim, n_actions)

    def forward(self, x):
        return self.q(x.reshape(x.shape[0], -1).float())


class Boltzmann(Policy):
    def __init__(self, net, temperature: float, seed):
        self.net, self.temperature = net, temperature
        self.gen = torch.Generator().manual_seed(seed)
        self.acted = 0

    def act(self, obs, clock):
        with torch.no_grad():
            p = F.softmax(self.net(torch.as_tensor(np.asarray(obs))) / self.temperature, dim=1)
        self.acted += len(obs)
        return torch.multinomial(p, 1, generator=self.gen)[:, 0].numpy().astype(np.int32)

    def stats(self):
        return {"tiny_acted": self.acted}


class Greedy(Policy):
    def __init__(self, net):
        self.net = net

    def act(self, obs, clock):
        with torch.no_grad():
            return self.net(torch.as_tensor(np.asarray(obs))).argmax(1).numpy().astype(np.int32)


class OneStepTD(Learning):
    def __init__(self, cfg, online):
        self.online, self.gamma = online, cfg.agent.gamma
        self.updates = self.int32_batches = self.other_batches = 0

    def gradients(self, batch, global_updates, accept):
        if batch.action.dtype == torch.int32:      # the agent's record reached the learner through replay
            self.int32_batches += 1
        else:
            self.other_batches += 1
        q = self.online(batch.obs).gather(1, batch.action.long().view(-1, 1)).squeeze(1)
        with torch.no_grad():
            target = batch.reward + batch.discount * self.online(batch.next_obs).max(1).values
        loss = F.mse_loss(q, target)
        info = {"loss": float(loss)}
        if not accept(info["loss"]):
            return info, False
        self.online.zero_grad(set_to_none=False)
        loss.backward()
        return info, True

    def after_update(self, global_updates):
        self.updates += 1

    def stats(self):
        return {"tiny_updates": self.updates, "tiny_int32_batches": self.int32_batches,
                "tiny_other_batches": self.other_batches}


class TinyAgent(Agent):
    name = "tiny"

    def configure(self, cfg, env):
        if env.continuous or len(env.obs_shape) != 1:
            raise ConfigError(f"the tiny agent needs vector observations and discrete actions ({cfg.env.name})")
        cfg.model.kind = "tiny_linear"
        cfg.model.obs_shape, cfg.model.n_actions, cfg.model.action_dim = list(env.obs_shape), env.n_actions, 0

    def network(self, cfg):
        return Linear(int(math.prod(cfg.model.obs_shape)), cfg.model.n_actions)

    def record(self, env):
        return Record(tuple(env.frame_shape), env.stack, np.dtype(env.dtype), (), np.dtype(np.int32), 0,
                      env.n_actions - 1)

    def behaviour(self, cfg, net, index, num_actors):
        return Boltzmann(net, temperature=1.0, seed=cfg.run.seed * 1000 + index)

    def evaluation(self, cfg, net, seed):
        return Greedy(net)

    def learning(self, cfg, online, load_theta, global_updates):
        return OneStepTD(cfg, online)
