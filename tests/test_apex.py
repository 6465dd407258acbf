"""Ape-X on the runtime: the actors' initial priorities (n-step |TD error| from the values they act
on), the shard taking them, the per-actor epsilon, the policy keeping its Q values, and the presets."""
from __future__ import annotations

import numpy as np
import pytest

from gorila_zmq import config as C
from gorila_zmq.agents.base import prepare
from gorila_zmq.fields import ConfigError
from gorila_zmq.replay.memory import ReplayMemory
from gorila_zmq.replay.priority import PrioritizedReplay
from gorila_zmq.replay.sinks import InitialPriorities


class Capture:
    """A ReplayWriter stand-in that keeps what it is given, in order."""

    def __init__(self):
        self.out = []

    def start_episode(self, frame, lane=0):
        self.out.append(("start", lane, float(np.asarray(frame).ravel()[0])))

    def add(self, action, reward, next_frame, terminated, truncated, lane=0, priority=None):
        self.out.append(("add", lane, float(np.asarray(next_frame).ravel()[0]), action, reward, terminated,
                         truncated, priority))

    def poll(self):
        pass

    def stats(self):
        return {}

    def close(self):
        self.out.append(("close",))


def direct_td(q, actions, rewards, t, n, gamma, done_at=None):
    """|G + gamma^k max Q(s_t+k) - Q(s_t, a_t)| straight from the definition (one lane)."""
    k = n if done_at is None else min(n, done_at - t + 1)
    g = sum(gamma ** i * rewards[t + i] for i in range(k))
    boot = 0.0 if (done_at is not None and t + k - 1 == done_at) else gamma ** k * q[t + k].max()
    return abs(g + boot - q[t][actions[t]])


@pytest.mark.parametrize("n", [1, 3])
def test_initial_priorities_are_the_actors_n_step_td_errors_sent_in_order(n):
    gamma, T = 0.9, 12
    rng = np.random.default_rng(n)
    q = rng.normal(size=(T + 1, 1, 3))               # Q(s_t, .) for one lane
    actions = rng.integers(3, size=T)
    rewards = rng.normal(size=T)
    sink = Capture()
    ip = InitialPriorities(sink, lanes=1, n_step=n, gamma=gamma)
    ip.start_episode(np.zeros(1))
    for t in range(T):
        ip.observe(q[t], actions[t:t + 1])
        ip.add(int(actions[t]), float(rewards[t]), np.full(1, t + 1.0), t == T - 1, False)
    steps = [o for o in sink.out if o[0] == "add"]
    assert [o[2] for o in steps] == [t + 1.0 for t in range(T)]          # every step, in order
    got = np.array([o[7] for o in steps])
    want = np.array([direct_td(q[:, 0], actions, rewards, t, n, gamma, done_at=T - 1) for t in range(T)])
    assert np.allclose(got, want), (got, want)
    assert [o[5] for o in steps] == [False] * (T - 1) + [True]


def test_a_step_waits_for_its_bootstrap_and_a_truncation_sends_the_rest_without_a_priority():
    sink = Capture()
    ip = InitialPriorities(sink, lanes=2, n_step=3, gamma=0.99)
    q = np.ones((2, 2))
    for lane in (0, 1):
        ip.start_episode(np.zeros(1), lane=lane)
    for t in range(3):
        ip.observe(q, [0, 0])
        for lane in (0, 1):
            ip.add(0, 1.0, np.full(1, t + 1.0), False, t == 2 and lane == 1, lane=lane)
    adds = [o for o in sink.out if o[0] == "add"]
    assert [(o[1], o[7]) for o in adds] == [(1, None)] * 3      # lane 1 truncated: sent, no priority
    assert adds[-1][6] is True                                  # the truncation flag travels with it
    ip.observe(q, [0, 0])                                        # lane 0's first step has its 3 rewards now
    first = [o for o in sink.out if o[0] == "add" and o[1] == 0]
    assert len(first) == 1 and np.isclose(first[0][7], abs(1 + 0.99 + 0.99 ** 2 + 0.99 ** 3 * 1 - 1))
    ip.close()                                                   # the rest go out (no priority), then close
    assert [o[7] for o in sink.out if o[0] == "add" and o[1] == 0][1:] == [None, None]
    assert sink.out[-1] == ("close",)
    assert ip.stats()["priorities_given"] == 1 and ip.stats()["priorities_none"] == 5


def test_a_given_priority_is_what_the_transition_enters_the_tree_at():
    with ReplayMemory(64, frame_shape=(1,), stack=1, dtype=np.float32, n_step=1) as rb:
        pr = PrioritizedReplay(rb, alpha=0.5, eps=0.01)
        rb.start_episode(np.zeros(1, np.float32))
        for t in range(6):
            rb.add(0, 1.0, np.full(1, t + 1, np.float32), False, False)
            if t % 2 == 0:
                pr.give(0, float(t))          # transitions 0, 2, 4: given; 1, 3, 5: none (the max)
        pr.sync()
        leaves = pr.tree.get(np.arange(6))
        assert np.allclose(leaves[[0, 2, 4]], (np.array([0.0, 2.0, 4.0]) + 0.01) ** 0.5)
        assert np.allclose(leaves[[1, 3, 5]], 1.0)                  # the tree's max was 1 when they entered
        with pytest.raises(ValueError):
            pr.give(0, float("nan"))


def test_the_policy_keeps_its_q_values_even_when_every_action_explores(make_cfg):
    import torch
    cfg = make_cfg("env.name=CartPole-v1", "roles.mode=global", "agent.prioritized=true",
                   "agent.actor_priorities=true", "dqn.eps_start=1.0", "dqn.eps_end=1.0")
    agent = prepare(cfg)
    net = agent.make_network(cfg)
    pol = agent.behaviour(cfg, net, 0, 1)
    obs = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    from gorila_zmq.agents.base import Clock
    pol.act(obs, Clock())
    with torch.no_grad():
        assert np.allclose(pol.q_values, net(torch.from_numpy(obs)).numpy())
    plain = agent.behaviour(make_cfg("env.name=CartPole-v1"), net, 0, 1)
    plain.act(obs, Clock())
    assert plain.q_values is None


def test_apex_presets_follow_the_paper_and_actor_priorities_need_prioritized_global_replay():
    from gorila_zmq.agents.dqn.agent import actor_epsilon
    for name in ("apex", "apex-small"):
        cfg = C.load(None, [], preset=name)
        cfg.validate()
        a, d = cfg.agent, cfg.dqn
        assert cfg.roles.mode == "global" and cfg.roles.learners == 1 and cfg.roles.replay_shards in (1, 2)
        assert a.prioritized and a.actor_priorities and a.n_step == 3 and d.double_dqn
        assert d.target_sync_every == 2_500
        N = cfg.roles.actors
        eps = [actor_epsilon(d, 10 ** 6 * g, i, N) for g in (0, 1) for i in range(N)]
        assert np.allclose(eps, [0.4 ** (1 + 7 * i / (N - 1)) for _ in (0, 1) for i in range(N)])   # constant
    assert C.load(None, [], preset="apex").agent.replay_capacity * 2 == 2_000_000
    for bad in (["agent.actor_priorities=true", "roles.mode=global"],
                ["agent.actor_priorities=true", "agent.prioritized=true"]):          # bundled
        with pytest.raises(ConfigError, match="actor_priorities"):
            C.load(None, bad).validate()
