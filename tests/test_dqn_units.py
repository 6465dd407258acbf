"""DQN pieces: schedules on the global count, the loss-outlier filter, the TD target, and a learner and
an actor driven against a real in-process shard."""
import threading
import time

import numpy as np
import pytest
import torch

from conftest import wait_for
from gorila_zmq.agents.common import Every, OutlierFilter, linear_schedule
from gorila_zmq.agents.dqn.agent import actor_epsilon
from gorila_zmq.agents.dqn.learning import td_loss


def test_linear_schedule_and_every():
    assert linear_schedule(1.0, 0.1, 100, 0) == 1.0
    assert linear_schedule(1.0, 0.1, 100, 50) == pytest.approx(0.55)
    assert linear_schedule(1.0, 0.1, 100, 10**9) == pytest.approx(0.1)
    e = Every(100)
    fired = [t for t in (5, 99, 100, 101, 250, 260, 299, 300, 1000) if e(t)]
    assert fired == [100, 250, 300, 1000]           # counters may jump: one firing per crossing
    assert not Every(0)(10)


def test_actor_epsilon_spread_is_an_option():
    from gorila_zmq import config as C
    a = C.Config().dqn
    assert actor_epsilon(a, 0) == 1.0 and actor_epsilon(a, a.eps_anneal_updates) == pytest.approx(0.1)
    a.eps_per_actor = True
    ends = [actor_epsilon(a, 10**9, i, 8) for i in range(8)]
    assert ends[0] == pytest.approx(0.1) and all(x > y for x, y in zip(ends, ends[1:]))


def test_outlier_filter_drops_the_planted_spike_and_nothing_else():
    rng = np.random.default_rng(0)
    f = OutlierFilter(k=5.0, warmup=100)
    losses = np.abs(rng.normal(1.0, 0.1, 1000))
    spike_at = 600
    losses[spike_at] = 50.0
    accepted = [f.accept(x) for x in losses]
    assert [i for i, a in enumerate(accepted) if not a] == [spike_at]
    assert not f.accept(float("nan"))
    # warm-up: nothing dropped during the first `warmup` losses, however odd
    g = OutlierFilter(k=1.0, warmup=10)
    assert all(g.accept(x) for x in [1, 100, 1, 1000, 1, 1, 1, 1, 1, 1])


def test_td_loss_target_by_hand():
    q = torch.nn.Linear(2, 3, bias=False)
    tgt = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        q.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        tgt.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))
    obs = torch.tensor([[1.0, 2.0]])
    nxt = torch.tensor([[1.0, 1.0]])
    a = torch.tensor([1])
    # q(obs)[1] = 2; target = r + d * max_a tgt(nxt) = 0.5 + 0.9 * 3 = 3.2; squared loss (2 - 3.2)^2
    loss, _ = td_loss(q, tgt, obs, a, torch.tensor([0.5]), torch.tensor([0.9]), nxt, huber=False)
    assert loss.item() == pytest.approx(1.44)
    # double DQN: online picks argmax q(nxt) = action 2 (value 2), evaluated by target: 0
    loss, _ = td_loss(q, tgt, obs, a, torch.tensor([0.5]), torch.tensor([0.9]), nxt, double=True, huber=False)
    assert loss.item() == pytest.approx((2 - 0.5) ** 2)
    # terminal: discount 0
    loss, _ = td_loss(q, tgt, obs, a, torch.tensor([0.5]), torch.tensor([0.0]), nxt, huber=False)
    assert loss.item() == pytest.approx(1.5 ** 2)


CARTPOLE = ["env.name=CartPole-v1", "model.kind=mlp", "model.hidden=[32]", "env.clip_rewards=false"]


@pytest.fixture
def shard(make_cfg, ctx):
    from gorila_zmq.launch.program import prepare_run
    from gorila_zmq.roles.ps import ParameterServerShard
    made = []

    def start(*overrides):
        cfg = make_cfg(*CARTPOLE, *overrides)
        prepare_run(cfg)
        s = ParameterServerShard(cfg, 0, ctx)
        t = threading.Thread(target=s.run, daemon=True)
        t.start()
        made.append((s, t))
        return cfg, s
    yield start
    for s, t in made:
        s.request_stop()
        t.join(10)
        s.close()


def _advance(ctx, cfg, n):
    """Apply n tiny gradients from another client: the global count moves without this learner."""
    from gorila_zmq.ps.client import GradientPusher, ShardSet
    from gorila_zmq.ps.layout import ParamLayout
    from gorila_zmq.agents.base import build_network
    layout = ParamLayout.from_module(build_network(cfg))
    p = GradientPusher(ctx, ShardSet(cfg, layout))
    for _ in range(n):
        p.push(np.full(layout.size, 1e-6, np.float32), p.versions)
    assert p.flush(10)
    p.close()


def _filled_replay(n=500):
    from gorila_zmq.replay.memory import ReplayMemory
    rb = ReplayMemory(1000, frame_shape=(4,), stack=1, dtype=np.float32)
    rng = np.random.default_rng(0)
    rb.start_episode(rng.standard_normal(4).astype(np.float32))
    for t in range(n):
        end = t % 50 == 49
        rb.add(int(rng.integers(2)), 1.0, rng.standard_normal(4).astype(np.float32), end, False)
        if end:
            rb.start_episode(rng.standard_normal(4).astype(np.float32))
    return rb


def test_learner_syncs_target_every_n_global_updates(shard, ctx):
    from gorila_zmq.replay.sources import MemorySource
    from gorila_zmq.roles.learner import Learner
    cfg, s = shard("dqn.target_sync_every=10", "agent.learning_starts=64", "agent.batch_size=16", "ps.broadcast_every=1",
                   "ps.max_staleness=100000")
    rb = _filled_replay()
    learner = Learner(cfg, 0, ctx, source=MemorySource(rb))
    try:
        assert learner.learning.target_syncs == 1                   # at start
        learner.step()
        wait_for(lambda: (learner.pusher.poll(0.05), learner.pusher.in_flight() == 0)[1], 10, what="push replies")
        assert s.state.version == 1 and learner.learning.target_syncs == 1
        _advance(ctx, cfg, 8)                              # global 9: no sync yet
        learner.step()                                     # global 10 after this push
        learner.pusher.flush(5)
        learner.step()                                     # sees the reply's version 10 -> syncs
        assert learner.learning.target_syncs == 2
        _advance(ctx, cfg, 25)                             # 11 -> 36 jumps over 20 and 30: one sync
        wait_for(lambda: learner.sub.global_version == 36, 10, what="the broadcast of version 36")
        learner.step()
        learner.pusher.flush(5)
        learner.step()
        assert learner.learning.target_syncs == 3
        # the target network holds the shard's parameters of that sync and does not follow theta: once
        # this learner's last push has landed and another client moved theta on, they differ
        from gorila_zmq.ps.client import fetch_params
        assert learner.pusher.flush(5)
        _advance(ctx, cfg, 1)
        tgt = learner.layout.flatten(learner.learning.target)
        assert not np.array_equal(tgt, fetch_params(ctx, learner.shards)[0])   # moved on since
    finally:
        learner.close()
        rb.close()
        rb.unlink()


def test_actor_epsilon_follows_the_global_count(shard, ctx):
    from gorila_zmq.roles.actor import Actor
    cfg, s = shard("dqn.eps_anneal_updates=20", "dqn.eps_start=1.0", "dqn.eps_end=0.1",
                   "ps.broadcast_every=1", "agent.replay_capacity=1000", "agent.learning_starts=100",
                   "ps.max_staleness=100000")
    actor = Actor(cfg, 0, ctx)
    try:
        actor.step()
        assert actor.policy.epsilon == 1.0
        _advance(ctx, cfg, 10)
        wait_for(lambda: actor.sub.global_version == 10, 10, what="the broadcast")
        actor.step()
        assert actor.policy.epsilon == pytest.approx(0.55)
        _advance(ctx, cfg, 15)
        wait_for(lambda: actor.sub.global_version == 25, 10, what="the broadcast")
        actor.step()
        assert actor.policy.epsilon == pytest.approx(0.1)
        assert len(actor.replay.memory) >= 3
    finally:
        actor.close()


def test_outlier_filter_relearns_a_new_loss_level_instead_of_locking_out():
    rng = np.random.default_rng(1)
    f = OutlierFilter(k=5.0, warmup=100, rewarm_after=50)
    for x in np.abs(rng.normal(1.0, 0.1, 500)):
        assert f.accept(x)
    accepted = [f.accept(x) for x in np.abs(rng.normal(2.5, 0.25, 1000))]
    assert f.rewarms == 1 and not any(accepted[:50]) and all(accepted[150:])


def test_replay_ratio_limiter_shares_learning_starts_and_updates_between_actors():
    from gorila_zmq import config as C
    from gorila_zmq.roles.actor import allowed_transitions
    bundled = C.load(None, ["roles.bundles=2", "agent.learning_starts=1000", "agent.max_steps_per_update=4"])
    assert allowed_transitions(bundled, 0) == 1000            # each bundle's own replay needs all of them
    assert allowed_transitions(bundled, 100) == 1000 + 4 * 100 / 2
    glob = C.load(None, ["roles.mode=global", "roles.actors=3", "agent.learning_starts=1000",
                         "agent.max_steps_per_update=2"])
    assert allowed_transitions(glob, 0) == 334                # the actors fill one replay together
    assert allowed_transitions(glob, 300) == 334 + 2 * 300 / 3
    assert allowed_transitions(C.load(None, ["agent.max_steps_per_update=0"]), 10) is None


def test_limiter_counts_from_the_first_version_seen_when_the_shards_answer_late():
    """An actor whose shards had not answered when it started (a resumed run's shards still loading)
    counts global updates from the first version it sees, not from 0: otherwise every update made
    before the resume would let it run ahead."""
    from types import SimpleNamespace
    from gorila_zmq.roles import actor as A
    from gorila_zmq import config as C
    cfg = C.load(None, ["roles.mode=global", "roles.actors=2", "agent.learning_starts=100",
                        "agent.max_steps_per_update=2", "agent.limiter_stall_s=1000"])
    me = SimpleNamespace(cfg=cfg, sub=SimpleNamespace(global_version=-1), vec=SimpleNamespace(n=1), steps=50,
                         updates_at_start=None, _progress=(0, A.time.monotonic()), stall_steps=0,
                         _throttled_since=None)
    throttled = lambda: A.Actor._throttled(me)            # noqa: E731
    assert not throttled()                                # no version yet: its share of learning_starts
    me.steps = 51
    assert throttled()
    me.sub.global_version = 5000                          # the resumed shards answer
    assert throttled() and me.updates_at_start == 5000
    me.sub.global_version = 5010
    assert not throttled()                                # 51 <= 50 + 2 * 10 / 2
    me.steps = 61
    assert throttled()


def test_limiter_lets_actors_step_once_the_global_count_stalls(monkeypatch):
    """Over the limit, an actor waits while the learners progress; once the global count has not moved
    for agent.limiter_stall_s (starved learners: a replay shard restarted empty) it steps again, and
    it waits again as soon as the count moves."""
    from types import SimpleNamespace
    from gorila_zmq.roles import actor as A
    from gorila_zmq import config as C
    cfg = C.load(None, ["roles.mode=global", "roles.actors=2", "agent.learning_starts=100",
                        "agent.max_steps_per_update=2", "agent.limiter_stall_s=5"])
    clock = [1000.0]
    monkeypatch.setattr(A.time, "monotonic", lambda: clock[0])
    me = SimpleNamespace(cfg=cfg, sub=SimpleNamespace(global_version=10), vec=SimpleNamespace(n=1),
                         steps=50 + 10, updates_at_start=0, _progress=(10, clock[0]), stall_steps=0,
                         _throttled_since=None)
    throttled = lambda: A.Actor._throttled(me)            # noqa: E731
    assert not throttled()                                # 60 <= 50 + 2 * 10 / 2
    me.steps = 61
    assert throttled()
    clock[0] += 4.9
    assert throttled() and me.stall_steps == 0            # a slow learner is not a stalled one
    clock[0] += 0.2
    assert not throttled() and me.stall_steps == 1        # 5.1 s without an update: step
    me.steps = 200
    assert not throttled() and me.stall_steps == 2
    me.sub.global_version = 11                            # the learners resumed: the limit holds again
    assert throttled()
    clock[0] += 4.0
    assert throttled()
    # A long quiet spell under the limit (warm-up: filling learning_starts) is not a stall: the clock
    # starts when the actor reaches the limit.
    me.steps = 0
    clock[0] += 60.0
    assert not throttled()
    me.steps = 100
    assert throttled() and me.stall_steps == 2
    clock[0] += 4.9
    assert throttled()
    clock[0] += 0.2
    assert not throttled() and me.stall_steps == 3


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
def test_flat_staging_moves_whole_vectors_like_the_per_tensor_path(device):
    """The CUDA learner's transfers (one gather + one copy each way) give exactly the per-tensor
    path's vectors, a parameter without a gradient included (as zeros)."""
    from gorila_zmq.ps.layout import ParamLayout
    from gorila_zmq.roles.learner import FlatStaging
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3),
                              torch.nn.Linear(3, 2)).to(device)
    layout = ParamLayout.from_module(net)
    st = FlatStaging(layout, net, torch.device(device), pin=device == "cuda")
    net[0](torch.randn(4, 5, device=device)).sum().backward()     # net[2], net[3]: grad None
    assert net[2].weight.grad is None
    out = st.host_vector()
    out.fill_(7.0)                                                  # stale contents must be overwritten
    st.grads_to_host(out)
    st.copies_done()
    expect = layout.flatten_grads(net)
    np.testing.assert_array_equal(out.numpy(), expect)
    assert (expect[layout.entries[2].offset:] == 0).all() and (expect[:layout.entries[2].offset] != 0).any()
    theta = np.random.default_rng(1).standard_normal(layout.size).astype(np.float32)
    st.param_host.numpy()[:] = theta
    st.load_params()
    st.copies_done()
    np.testing.assert_array_equal(layout.flatten(net), theta)


def test_learner_with_flat_staging_pushes_its_gradient_and_loads_theta(shard, ctx):
    """The learner's CUDA transfer path, run on the CPU: the pushed vector is the model's gradient and
    a refresh loads the shard's theta into the online network."""
    from gorila_zmq.ps.client import fetch_params
    from gorila_zmq.replay.sources import MemorySource
    from gorila_zmq.roles.learner import FlatStaging, Learner
    cfg, s = shard("agent.learning_starts=64", "agent.batch_size=16", "ps.broadcast_every=1",
                   "ps.max_staleness=100000")
    rb = _filled_replay()
    learner = Learner(cfg, 0, ctx, source=MemorySource(rb))
    try:
        learner.staging = FlatStaging(learner.layout, learner.online, learner.device, pin=False)
        learner._flat, learner._seen = learner.staging.param_host.numpy(), -1
        learner.step()
        seq, pushed, host = learner._grad_bufs[-1]
        assert host is not None and pushed.ctypes.data == host.data_ptr()
        np.testing.assert_array_equal(pushed, learner.layout.flatten_grads(learner.online))
        assert np.abs(pushed).sum() > 0
        assert learner.pusher.flush(10) and s.state.version == 1
        wait_for(lambda: learner.sub.global_version == 1, 10, what="the broadcast of version 1")
        learner._refresh()
        np.testing.assert_array_equal(learner.layout.flatten(learner.online), fetch_params(ctx, learner.shards)[0])
    finally:
        learner.close()
        rb.close()
        rb.unlink()


def test_cpu_learner_accumulates_the_gradient_straight_into_the_push_buffer(shard, ctx):
    """On the CPU the parameters' .grad are bound to the next push buffer: what is pushed equals the
    gradient computed the ordinary way on the same batch, even when the recycled buffer held garbage,
    and no parameter refers to the buffer after the push."""
    import copy as copy_mod
    from gorila_zmq.replay.sources import MemorySource
    from gorila_zmq.roles.learner import Learner
    cfg, s = shard("agent.learning_starts=64", "agent.batch_size=16", "ps.max_staleness=100000")
    rb = _filled_replay()
    learner = Learner(cfg, 0, ctx, source=MemorySource(rb))
    expected = {}
    real = learner.learning.gradients

    def checked(batch, global_updates, accept):
        ref = copy_mod.deepcopy(learner.online)
        for p in ref.parameters():
            p.grad = None
        loss, _ = td_loss(ref, learner.learning.target, batch.obs, batch.action.long(), batch.reward,
                          batch.discount, batch.next_obs, double=cfg.dqn.double_dqn, huber=cfg.dqn.huber)
        loss.backward()
        expected["g"] = learner.layout.flatten_grads(ref)
        return real(batch, global_updates, accept)
    learner.learning.gradients = checked
    try:
        garbage = torch.full((learner.layout.size,), 7.0)
        learner._grad_bufs.append((-1, garbage.numpy(), garbage))      # a recycled, dirty buffer
        learner.step()
        seq, pushed, host = learner._grad_bufs[-1]
        assert host.data_ptr() == garbage.data_ptr()                       # that buffer was used
        np.testing.assert_allclose(pushed, expected["g"], rtol=1e-5, atol=1e-7)
        assert all(p.grad is None for p in learner.online.parameters())
        assert learner.pusher.flush(10) and s.state.version == 1
    finally:
        learner.close()
        rb.close()
        rb.unlink()


def test_unbinding_copies_a_replaced_grad_and_zeroes_a_missing_one():
    """DrQ-v2 sets the actor's .grad from autograd.grad (a new tensor, not the bound view): unbinding
    copies it into the buffer; a parameter left without a gradient reads as zeros."""
    from types import SimpleNamespace
    from gorila_zmq.ps.layout import ParamLayout
    from gorila_zmq.roles.learner import Learner
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    me = SimpleNamespace(layout=ParamLayout.from_module(net), _params=list(net.parameters()))
    host = torch.full((me.layout.size,), 5.0)
    views = Learner._bind_grads(me, host)
    net.zero_grad(set_to_none=False)
    assert (host == 0).all()
    net[0].weight.grad = torch.ones(4, 3)                   # replaced, as autograd.grad results are
    net[1].bias.grad = None                                 # missing
    net[1].weight.grad += 2.0                               # accumulated in place
    Learner._unbind_grads(me, views)
    e = me.layout.entries
    flat = host.numpy()
    assert (flat[e[0].offset:e[0].offset + e[0].size] == 1).all()
    assert (flat[e[2].offset:e[2].offset + e[2].size] == 2).all()
    assert (flat[e[3].offset:e[3].offset + e[3].size] == 0).all() and (flat[e[1].offset:e[1].offset + 4] == 0).all()
    assert all(p.grad is None for p in net.parameters())


def test_td_loss_weights_each_sample_and_returns_its_td_error():
    """Prioritized replay: loss = mean(w_i * l_i), priorities = |target - q| per sample."""
    torch.manual_seed(0)
    q, tgt = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    obs, nxt = torch.randn(5, 3), torch.randn(5, 3)
    a, r, d = torch.tensor([0, 1, 1, 0, 1]), torch.randn(5), torch.full((5,), 0.9)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 0.25])
    for huber in (True, False):
        loss, info = td_loss(q, tgt, obs, a, r, d, nxt, huber=huber, weight=w)
        qa = q(obs).gather(1, a.view(-1, 1)).squeeze(1)
        target = r + d * tgt(nxt).max(1).values
        delta = (target - qa).detach()
        each = torch.where(delta.abs() < 1, 0.5 * delta ** 2, delta.abs() - 0.5) if huber else delta ** 2
        assert loss.item() == pytest.approx((w * each).mean().item(), rel=1e-5)
        assert torch.allclose(info["priorities"], delta.abs())
    _, info = td_loss(q, tgt, obs, a, r, d, nxt)
    assert "priorities" not in info                  # uniform replay: nothing to write back


def test_learner_weights_its_loss_and_writes_the_new_priorities_back(shard, ctx):
    from gorila_zmq.replay.sources import MemorySource
    from gorila_zmq.roles.learner import Learner
    cfg, s = shard("agent.learning_starts=64", "agent.batch_size=16", "ps.max_staleness=100000",
                   "agent.prioritized=true", "agent.priority_alpha=0.5", "agent.priority_eps=0.01",
                   "agent.priority_beta=0.4", "agent.priority_beta_updates=100")
    rb = _filled_replay()
    src = MemorySource(rb, {"alpha": 0.5, "eps": 0.01})
    learner = Learner(cfg, 0, ctx, source=src)
    seen, written = [], []
    gradients, write_back = learner.learning.gradients, src.write_back

    def spy_gradients(batch, g, accept):
        seen.append(batch.weight.clone())
        return gradients(batch, g, accept)

    def spy_write_back(batch, td):
        written.append((batch.index.copy(), batch.weight.copy(), td.copy()))
        write_back(batch, td)
    learner.learning.gradients, src.write_back = spy_gradients, spy_write_back
    try:
        for _ in range(3):
            learner.step()
            learner.pusher.flush(5)
        wait_for(lambda: len(written) >= 3, 10, what="three updates")
        learner.loader.stop.set()
        learner.loader.join(5)
        src.refresh()                                   # the sampling thread's turn: apply the write-backs
        idx, weight, td = written[-1]
        assert np.allclose(seen[len(written) - 1].numpy(), weight)   # the loss saw this batch's weights
        assert weight.max() <= 1.0 and weight.min() > 0
        leaves = src.pr.tree.get(idx)
        latest = {}
        for i_, w_, t_ in written:                      # the newest write-back of each slot wins
            latest.update({int(i): float(t) for i, t in zip(i_, t_)})
        assert np.allclose(leaves, [(latest[int(i)] + 0.01) ** 0.5 for i in idx])
        assert src.pr.counters["priority_updates"] == 16 * len(written)
        assert learner.stats()["priority_updates"] == 16 * len(written)
        assert src.beta == pytest.approx(0.4 + 0.6 * min(1, learner.sub.global_version / 100), abs=0.02)
    finally:
        learner.close()
        rb.close()
        rb.unlink()


def test_prioritized_replay_is_refused_for_an_agent_without_priorities(make_cfg):
    from gorila_zmq.agents import base
    from gorila_zmq.fields import ConfigError
    cfg = make_cfg("agent.name=drqv2", "env.name=dmc:cartpole_swingup", "agent.prioritized=true")
    with pytest.raises(ConfigError, match="prioritized replay is for dqn"):
        base.prepare(cfg)


def test_allowed_updates_holds_each_learner_to_its_share_of_the_inserts(make_cfg):
    from gorila_zmq.roles.learner import allowed_updates
    bundled = make_cfg(*CARTPOLE, "agent.max_steps_per_update=4", "agent.max_updates_ahead=10",
                       "roles.mode=bundled", "roles.bundles=2")
    assert allowed_updates(bundled, 400) == 10 + 100                 # its own bundle: 400 / 4
    glob = make_cfg(*CARTPOLE, "agent.max_steps_per_update=4", "agent.max_updates_ahead=10", "roles.mode=global",
                    "roles.actors=2", "roles.replay_shards=1", "roles.learners=2", "agent.grads_per_push=3")
    assert allowed_updates(glob, 400) == 3 * (10 + 50)               # half of every shard's, 3 batches a push
    assert allowed_updates(make_cfg(*CARTPOLE, "agent.max_steps_per_update=4", "agent.max_updates_ahead=0"), 1) is None
    assert allowed_updates(make_cfg(*CARTPOLE, "agent.max_steps_per_update=0"), 1) is None


def test_insert_count_survives_a_recreated_memory_and_a_restarted_shard():
    from gorila_zmq.replay.sources import InsertCount
    c = InsertCount(2)
    assert c.see(0, 100, key=1) == 100 and c.see(0, 130, key=1) == 130
    assert c.see(0, 20, key=2) == 150                 # a new memory: all of its transitions are new
    assert c.see(1, 50) == 200 and c.see(1, 10) == 210    # a shard's count went back: it restarted
    assert c.see(1, 10) == 210


def test_a_learner_ahead_of_the_inserts_waits_for_them(shard, ctx):
    """The learner's side of the replay-ratio limiter: with nothing inserted since it started, it makes
    max_updates_ahead updates and waits; each max_steps_per_update transitions inserted allow one more."""
    from gorila_zmq.replay.sources import MemorySource
    from gorila_zmq.roles.learner import Learner
    cfg, s = shard("agent.learning_starts=64", "agent.batch_size=16", "ps.max_staleness=100000",
                   "agent.max_steps_per_update=4", "agent.max_updates_ahead=3", "agent.outlier_k=0")
    rb = _filled_replay(300)
    learner = Learner(cfg, 0, ctx, source=MemorySource(rb))
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and learner.throttled_s < 0.5:
            learner.step()
        assert learner.updates == 3 and learner.throttled_s >= 0.5
        rng = np.random.default_rng(1)
        for _ in range(8):                                 # 8 transitions at 4 per update: 2 more
            rb.add(0, 0.0, rng.standard_normal(4).astype(np.float32), False, False)
        wait_for(lambda: (learner.step(), learner.updates >= 5)[1], 20, 0.0, "two more updates")
        before = learner.throttled_s
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and learner.throttled_s < before + 0.5:
            learner.step()
        assert learner.updates == 5 and learner.stats()["throttled_s"] >= before + 0.5
    finally:
        learner.close()
        rb.close()
        rb.unlink()


def test_dropped_batches_and_refused_pushes_do_not_use_up_the_learners_slack(shard, ctx):
    """The actors pace themselves by global updates, so the learner's side of the limiter counts only
    minibatches that become (or may still become) one: with a slack of 3, five batches the outlier
    filter drops, then three pushes shard 0 refused, still leave it 3 updates ahead of the inserts. Had
    they counted, both sides would wait on each other for good."""
    from gorila_zmq.replay.sources import MemorySource
    from gorila_zmq.roles.learner import Learner
    cfg, s = shard("agent.learning_starts=64", "agent.batch_size=16", "ps.max_staleness=100000",
                   "agent.max_steps_per_update=4", "agent.max_updates_ahead=3", "agent.outlier_k=0")
    rb = _filled_replay(300)
    learner = Learner(cfg, 0, ctx, source=MemorySource(rb))
    verdicts = iter([False] * 5)
    learner.filter.accept = lambda loss: next(verdicts, True)

    def run_until_held():
        before = learner.throttled_s
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and learner.throttled_s < before + 0.5:
            learner.step()
    try:
        run_until_held()
        assert learner.dropped == 5 and learner.updates == 3 and learner.paced_updates() == 3
        learner.pusher.flush(10)
        learner.pusher.stats.by_shard[0]["stale"] += 2     # as if shard 0 had discarded two of them ...
        learner.pusher.stats.by_shard[0]["rejected"] += 1  # ... and refused the third
        run_until_held()
        assert learner.updates == 6 and learner.paced_updates() == 3
    finally:
        learner.close()
        rb.close()
        rb.unlink()


def test_a_learner_whose_shard_is_gone_stops_promptly(shard, ctx):
    """With its only shard gone, a learner's window fills with pushes nobody answers; each is resent and
    given up only after request_timeout_s x (request_retries + 1) = 20 s. A stop asked meanwhile ends
    the learner's loop and closes it within a few seconds all the same."""
    from gorila_zmq.replay.sources import MemorySource
    from gorila_zmq.roles.learner import Learner
    cfg, s = shard("agent.learning_starts=64", "agent.batch_size=16", "ps.max_staleness=100000",
                   "agent.outlier_k=0", "net.request_timeout_s=5", "net.request_retries=3")
    rb = _filled_replay()
    learner = Learner(cfg, 0, ctx, source=MemorySource(rb))
    s.request_stop()
    wait_for(lambda: s.state is None, 10, what="the shard to stop")
    t = threading.Thread(target=learner.run, daemon=True)
    try:
        t.start()
        wait_for(lambda: learner.pusher.in_flight() == cfg.net.in_flight, 20, what="the window to fill")
        time.sleep(0.5)                                  # the learner is now waiting for room
        assert learner.updates == cfg.net.in_flight and learner.pusher.stats.lost == 0
        learner.request_stop()
        t.join(10)                                       # the loop's wait (0.25 s) + close's flush (2 s)
        assert not t.is_alive(), "the learner is still waiting for its gone shard"
    finally:
        learner.request_stop()
        t.join(30)
        rb.close()
        rb.unlink()


def test_an_evaluation_is_played_again_from_best_npz_and_its_seed(shard, ctx, tmp_path):
    """The evaluator role against a real shard: its record names the seed, best.npz keeps the theta it
    played, and `gorila-zmq eval --seed` on best.npz plays the same episodes (CartPole and epsilon's
    draws are seeded: the same returns); another seed plays others."""
    import json
    from gorila_zmq.cli import eval_main
    from gorila_zmq.roles.evaluator import Evaluator
    cfg, s = shard("eval.epsilon=0.5", "eval.episodes=4", "eval.interval_s=1000", "ps.max_staleness=100000")
    _advance(ctx, cfg, 3)
    ev = Evaluator(cfg, 0, ctx)
    try:
        ev._next = 0.0
        ev.step()
    finally:
        ev.close()
    rec = [json.loads(line) for line in open(f"{cfg.run.run_dir}/evaluations.jsonl")][-1]
    assert rec["episodes"] == 4 and rec["global_updates"] == 3

    def replay(seed):
        out = tmp_path / f"eval{seed}.json"
        threads = torch.get_num_threads()              # eval_main sets the evaluator's: this process's back after
        try:
            assert eval_main(["--checkpoint", f"{cfg.run.run_dir}/best.npz", "--seed", str(seed),
                              "--json", str(out)]) == 0
        finally:
            torch.set_num_threads(threads)
        return json.load(open(out))
    again = replay(rec["seed"])
    assert again["seed"] == rec["seed"]
    assert [again[k] for k in ("return_mean", "return_min", "return_max")] == \
        [rec[k] for k in ("return_mean", "return_min", "return_max")], (again, rec)
    other = replay(rec["seed"] + 1)
    assert [other[k] for k in ("return_mean", "return_min", "return_max")] != \
        [rec[k] for k in ("return_mean", "return_min", "return_max")]


def test_a_resumed_evaluator_goes_on_counting_evaluations_and_up_time(shard, ctx, caplog):
    """RUN_DIR/state/evaluator.json: a clean stop keeps the evaluator's count and its up time; the next
    start of the run goes on from them (new seeds, `run_seconds` that leave out the time it was
    stopped), and an unreadable file is a warning and a count from 0, not a crash."""
    import json
    import time
    from gorila_zmq.roles.evaluator import Evaluator
    cfg, s = shard("eval.episodes=1", "eval.interval_s=1000", "ps.max_staleness=100000")
    _advance(ctx, cfg, 2)
    history, state_path = f"{cfg.run.run_dir}/evaluations.jsonl", f"{cfg.run.run_dir}/state/evaluator.json"

    def one_evaluation():
        t0 = time.monotonic()
        ev = Evaluator(cfg, 0, ctx)
        try:
            ev._next = 0.0
            ev.step()
            up_by = time.monotonic() + 0.05     # up time after the last evaluation counts too, at the stop
            while time.monotonic() < up_by:
                time.sleep(0.005)
            ev.finish()
        finally:
            ev.close()
        return [json.loads(line) for line in open(history)][-1], time.monotonic() - t0

    first, _ = one_evaluation()
    kept = json.load(open(state_path))
    assert kept["evaluations"] == 1 and kept["run_seconds"] >= first["run_seconds"] + 0.05 > 0.05
    # as if the run had been up for 1000 s over 7 evaluations before it was stopped
    json.dump({"evaluations": 7, "run_seconds": 1000.0}, open(state_path, "w"))
    rec, took = one_evaluation()
    assert rec["seed"] == cfg.run.seed + 7919 * 8 != first["seed"]
    assert 1000.0 <= rec["run_seconds"] <= 1000.0 + took
    assert json.load(open(state_path))["evaluations"] == 8
    for bad in ("{not json", '{"evaluations": "many"}', '{"evaluations": 3, "run_seconds": -5}', "[1, 2]"):
        open(state_path, "w").write(bad)
        caplog.clear()
        rec, took = one_evaluation()
        assert rec["seed"] == cfg.run.seed + 7919 and rec["run_seconds"] <= took, bad
        assert "evaluator.json is unreadable" in caplog.text, bad


@pytest.mark.parametrize("layout", ["auto", "frames"])
def test_shared_frames_batches_give_the_learner_the_same_loss_and_gradient(layout, make_cfg):
    """agent.batch_layout: a bundled learner's source samples rows of stack + 1 frames (n_step 1), and
    the learner moves that one tensor to its device and views obs and next_obs in it: the same
    tensors, the same TD loss and gradient as with separate obs and next_obs of the same rows."""
    from gorila_zmq.agents.dqn.networks import NatureCNN
    from gorila_zmq.replay.memory import ReplayMemory
    from gorila_zmq.replay.sources import MemorySource
    from gorila_zmq.roles.learner import batch_to_device
    rng = np.random.default_rng(0)
    with ReplayMemory(400, frame_shape=(84, 84), stack=4, dtype=np.uint8, n_step=1) as rb:
        rb.start_episode(rng.integers(0, 255, (84, 84), dtype=np.uint8))
        for t in range(300):
            rb.add(int(rng.integers(6)), float(rng.standard_normal()), rng.integers(0, 255, (84, 84), dtype=np.uint8),
                   t % 37 == 36, False)
            if t % 37 == 36:
                rb.start_episode(rng.integers(0, 255, (84, 84), dtype=np.uint8))
        pairs = MemorySource(rb, batch_layout="pairs").allocate(16)
        shared = MemorySource(rb, batch_layout=layout).allocate(16)
        assert pairs.frames is None and shared.frames is not None
        rb.sample(16, np.random.default_rng(3), out=pairs)
        rb.sample(16, np.random.default_rng(3), out=shared)
        a = batch_to_device(pairs.as_tensors(), torch.device("cpu"), False, False)
        b = batch_to_device(shared.as_tensors(), torch.device("cpu"), False, False)
        assert not b.obs.is_contiguous() and b.obs.data_ptr() == shared.frames.ctypes.data
        for k in ("obs", "action", "reward", "discount", "next_obs"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
        torch.manual_seed(0)
        q, tgt = NatureCNN(n_actions=6), NatureCNN(n_actions=6)
        grads = []
        for batch in (a, b):
            q.zero_grad()
            loss, _ = td_loss(q, tgt, batch.obs, batch.action, batch.reward, batch.discount, batch.next_obs,
                              double=True)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in q.parameters()]))
        assert torch.equal(grads[0], grads[1])
        # prioritized replay samples into the same layout
        prio = {"alpha": 0.6, "eps": 1e-6, "weight_norm": "batch"}
        got = []
        for lay in ("pairs", layout):
            src = MemorySource(rb, prioritized=prio, batch_layout=lay)
            got.append(src.sample(16, np.random.default_rng(4), src.allocate(16)))
        assert got[1].frames is not None and np.array_equal(got[0].index, got[1].index)
        assert np.array_equal(got[0].obs, got[1].obs) and np.array_equal(got[0].next_obs, got[1].next_obs)
        assert np.array_equal(got[0].weight, got[1].weight)
    cfg = make_cfg("agent.n_step=3", "agent.batch_layout=auto")
    assert cfg.agent.batch_layout == "auto"
    from gorila_zmq.config import ConfigError
    with pytest.raises(ConfigError, match="batch_layout=frames needs agent.n_step=1"):
        make_cfg("agent.n_step=3", "agent.batch_layout=frames")
    with pytest.raises(ConfigError, match="is not one of: auto, pairs, frames"):
        make_cfg("agent.batch_layout=five")


@pytest.mark.parametrize("shm_push", ["auto", "off"])
def test_a_learner_beside_its_shard_pushes_through_shared_memory(shm_push, shard, ctx):
    """net.shm_push=auto: the learner's gradient buffers are shared-memory segments that the shard on
    its host reads in place (the push names the buffer); =off: the bytes go over the socket. Either way
    every push is applied, and a buffer is reused only once answered (no new segment per update)."""
    from gorila_zmq.replay.sources import MemorySource
    from gorila_zmq.roles.learner import Learner
    cfg, s = shard(f"net.shm_push={shm_push}", "agent.learning_starts=64", "agent.batch_size=16",
                   "ps.max_staleness=100000")
    rb = _filled_replay()
    learner = Learner(cfg, 0, ctx, source=MemorySource(rb))
    try:
        for _ in range(6):
            learner.step()
        assert learner.pusher.flush(5)
        assert s.state.version == 6 and learner.pusher.stats.applied == 6
        local = shm_push == "auto"
        assert s.counters["shm_pushes"] == learner.pusher.stats.local == (6 if local else 0)
        if local:
            assert len(learner.pusher.segments) <= cfg.net.in_flight + 2
            assert learner.pusher.bytes_sent < 1000
    finally:
        learner.close()
        rb.close()
        rb.unlink()
