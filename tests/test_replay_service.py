"""The global replay server on real sockets: adds, samples, idempotent retries, and bad input."""
import threading

import numpy as np
import pytest
import zmq
from conftest import wait_for

from gorila_zmq.net import protocol as P
from gorila_zmq.agents.base import prepare
from gorila_zmq.envs import env_spec
from gorila_zmq.net.rpc import request
from gorila_zmq.replay.records import ADD, START
from gorila_zmq.replay.sinks import ReplayWriter
from gorila_zmq.replay.sources import RemoteSource
from gorila_zmq.roles.replay import ReplayServer


def spec(cfg):
    """The replay record of the configured agent and environment."""
    return prepare(cfg).record(env_spec(cfg))

CARTPOLE = ["env.name=CartPole-v1", "model.kind=mlp", "roles.mode=global", "roles.actors=2",
            "roles.replay_shards=2", "agent.replay_capacity=2000", "agent.learning_starts=10"]


def running_shards(cfg, ctx):
    """Two replay shards of `cfg`, each serving on its own thread, stopped when the test ends."""
    prepare(cfg)
    servers = [ReplayServer(cfg, r, ctx) for r in range(2)]
    threads = [threading.Thread(target=s.run, daemon=True) for s in servers]
    for t in threads:
        t.start()
    yield cfg, servers
    for s in servers:
        s.request_stop()
    for t in threads:
        t.join(10)


@pytest.fixture
def server(make_cfg, ctx):
    yield from running_shards(make_cfg(*CARTPOLE), ctx)


def ask(ctx, cfg, shard, hdr, payload=None):
    from gorila_zmq.net import topology
    try:
        return request(ctx, topology.replay(cfg, shard).connect, hdr, payload, timeout_s=2.0, retries=0)
    except P.ProtocolError as e:
        return e.status, None


def records(cfg, n, actions=None, kinds=None):
    rec = np.zeros(n, spec(cfg).wire_dtype())
    rec["kind"] = ADD if kinds is None else kinds
    rec["kind"][0] = START
    rec["action"] = 0 if actions is None else actions
    rec["frame"] = np.arange(n, dtype=np.float32)[:, None]
    return rec.tobytes()


def test_writer_to_sampler_round_trip(server, ctx):
    cfg, servers = server
    s = spec(cfg)
    for actor in (0, 1):                              # actor j writes to shard j % 2
        w = ReplayWriter(ctx, cfg, actor, s)
        w.start_episode(np.zeros(4, np.float32), lane=0)
        for t in range(40):
            w.add(t % 2, 1.0, np.full(4, t + 1, np.float32), t == 39, False, lane=0)
        w.close()
    assert servers[0].counters["records_in"] == servers[1].counters["records_in"] == 41
    src = RemoteSource(ctx, cfg, 0, s)
    assert src.ready(20)
    for _ in range(2):                                # one batch from each shard in turn
        b = src.sample(8, None, src.allocate(8, pinned=False))
        assert b.obs.shape == (8, 4) and (b.next_obs[:, 0] == b.obs[:, 0] + 1).all()   # consecutive frames
        assert ((b.action == b.obs[:, 0].astype(int) % 2)).all()
    assert src.inserted == 80                         # both shards' transitions (ready() asked them)
    src.close()


def test_remote_source_keeps_the_insert_count_for_the_learners_limiter(make_cfg, ctx):
    cfg_ = make_cfg(*CARTPOLE, "agent.max_steps_per_update=4")
    for cfg, servers in running_shards(cfg_, ctx):
        s = spec(cfg)
        src = RemoteSource(ctx, cfg, 0, s)
        assert src.inserted == 0
        w = ReplayWriter(ctx, cfg, 1, s)                  # actor 1 writes to shard 1
        w.start_episode(np.zeros(4, np.float32), lane=0)
        for t in range(30):
            w.add(0, 1.0, np.full(4, t + 1, np.float32), False, False, lane=0)
        w.close()
        wait_for(lambda: (src.refresh(), src.inserted == 30)[1], 10, 0.3, "the shards' insert counts")
        src.close()


def test_retried_batch_applies_once_and_a_gap_restarts_the_episode(server, ctx):
    cfg, servers = server
    hdr = lambda seq, inc=7: P.Header(P.Cmd.REPLAY_ADD, shard=0, client=0, seq=seq, incarnation=inc, dtype=P.Dtype.RAW)
    assert ask(ctx, cfg, 0, hdr(1), records(cfg, 5))[0].command == P.Cmd.REPLY
    assert ask(ctx, cfg, 0, hdr(1), records(cfg, 5))[0].command == P.Cmd.REPLY   # the retry: skipped
    assert servers[0].counters["duplicates"] == 1 and servers[0].counters["records_in"] == 5
    no_start = records(cfg, 3, kinds=ADD)[:]
    rec = np.frombuffer(no_start, spec(cfg).wire_dtype()).copy()
    rec["kind"] = ADD
    ask(ctx, cfg, 0, hdr(3), rec.tobytes())                                 # seq 2 was lost: a gap
    assert servers[0].counters["gaps"] == 1 and servers[0].counters["orphans_restarted"] == 1
    ask(ctx, cfg, 0, hdr(1, inc=8), records(cfg, 2))                        # a restarted actor
    assert servers[0].counters["gaps"] == 2


@pytest.mark.parametrize("name, frames, status", [
    ("action out of range", lambda cfg: records(cfg, 3, actions=np.array([0, 5, 0])), P.Status.BAD_PAYLOAD),
    ("negative action", lambda cfg: records(cfg, 3, actions=np.array([0, -1, 0])), P.Status.BAD_PAYLOAD),
    ("partial record", lambda cfg: records(cfg, 3)[:-1], P.Status.BAD_SIZE),
])
def test_bad_adds_are_refused_and_the_server_keeps_serving(server, ctx, name, frames, status):
    cfg, servers = server
    hdr = P.Header(P.Cmd.REPLAY_ADD, shard=0, client=0, seq=1, incarnation=1, dtype=P.Dtype.RAW)
    assert ask(ctx, cfg, 0, hdr, frames(cfg))[0] == status
    assert servers[0].counters["records_in"] == 0
    rh, body = ask(ctx, cfg, 0, P.Header(P.Cmd.STATS, shard=0))
    assert P.as_json(rh, body)["rejected_total"] == 1


def test_a_refused_add_changes_no_state(server, ctx):
    """A batch refused for a NaN reward leaves the actor's sequence table alone: the same seq, valid,
    is then applied (not dropped as a duplicate) and opens no gap."""
    cfg, servers = server
    hdr = P.Header(P.Cmd.REPLAY_ADD, shard=0, client=0, seq=1, incarnation=5, dtype=P.Dtype.RAW)
    bad = np.frombuffer(records(cfg, 4), spec(cfg).wire_dtype()).copy()
    bad["reward"][2] = np.nan
    assert ask(ctx, cfg, 0, hdr, bad.tobytes())[0] == P.Status.NON_FINITE
    assert ask(ctx, cfg, 0, hdr, records(cfg, 4))[0].command == P.Cmd.REPLY
    c = servers[0].counters
    assert c["records_in"] == 4 and c["duplicates"] == 0 and c["gaps"] == 0


def test_a_refused_add_from_a_new_incarnation_keeps_the_open_episode(server, ctx):
    """A refused batch that claims a restarted actor (new incarnation) closes no lane: the actor's
    next batch continues its episode with no gap and no orphan."""
    cfg, servers = server
    hdr = lambda seq, inc: P.Header(P.Cmd.REPLAY_ADD, shard=0, client=0, seq=seq, incarnation=inc, dtype=P.Dtype.RAW)
    assert ask(ctx, cfg, 0, hdr(1, 5), records(cfg, 4))[0].command == P.Cmd.REPLY
    bad = np.frombuffer(records(cfg, 3), spec(cfg).wire_dtype()).copy()
    bad["kind"], bad["reward"][1] = ADD, np.inf
    assert ask(ctx, cfg, 0, hdr(1, 6), bad.tobytes())[0] == P.Status.NON_FINITE
    good = bad.copy()
    good["reward"] = 1.0
    assert ask(ctx, cfg, 0, hdr(2, 5), good.tobytes())[0].command == P.Cmd.REPLY
    c = servers[0].counters
    assert c["records_in"] == 7 and c["gaps"] == 0 and c["orphans_restarted"] == 0 and c["duplicates"] == 0


@pytest.mark.parametrize("body", [{"batch": 4, "min_size": "x"}, {"batch": True}, {"batch": 4, "min_size": -1}, {"batch": "4"}, {"batch": 10**9}, {"batch": 4.0}])
def test_bad_sample_requests(server, ctx, body):
    cfg, servers = server
    assert ask(ctx, cfg, 0, P.Header(P.Cmd.REPLAY_SAMPLE, shard=0), body)[0] == P.Status.BAD_PAYLOAD
    deep = P.Header(P.Cmd.REPLAY_SAMPLE, shard=0, dtype=P.Dtype.JSON)
    from gorila_zmq.net import topology
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(topology.replay(cfg, 0).connect)
    for payload in (b"[" * 60000, b'{"batch": ' + b"9" * 5000 + b"}"):   # too deep; past int-string limit
        deep.length = len(payload)
        s.send_multipart([deep.pack(), payload])
        assert s.poll(2000)
        rh, _ = P.parse(s.recv_multipart())
        assert rh.command == P.Cmd.ERROR and rh.status == P.Status.BAD_PAYLOAD
    s.close()
    assert "REJECTED" not in servers[0].stats()["rejected"]            # no internal error on the way
    # still serving: an empty memory answers BUSY, not a crash
    assert ask(ctx, cfg, 0, P.Header(P.Cmd.REPLAY_SAMPLE, shard=0), {"batch": 4})[0] == P.Status.BUSY


def test_status_reaches_every_replay_shard(server, ctx):
    cfg, servers = server
    from gorila_zmq.launch.status import collect
    from gorila_zmq.launch.program import make_program
    st = collect(cfg, [s for s in make_program(cfg, layout_hash=0) if s.role == "replay"], ctx, 1.0)
    assert set(st) == {"replay0", "replay1"} and all(v is not None for v in st.values())


DMC = ["env.name=cartpole_swingup", "agent.name=drqv2", "roles.mode=global", "roles.actors=1",
       "roles.replay_shards=1", "agent.replay_capacity=200", "agent.learning_starts=10", "agent.n_step=3",
       "env.action_repeat=2"]


def test_continuous_actions_and_rgb_frames_round_trip_and_bad_actions_are_refused(make_cfg, ctx):
    pytest.importorskip("dm_control")
    cfg = make_cfg(*DMC)
    prepare(cfg)
    s = spec(cfg)
    assert s.action_dtype == np.float32 and s.action_shape == (1,) and s.frame_shape == (3, 84, 84)
    srv = ReplayServer(cfg, 0, ctx)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        w = ReplayWriter(ctx, cfg, 0, s)
        w.start_episode(np.zeros((3, 84, 84), np.uint8))
        for k in range(30):
            w.add(np.array([k / 30 - 0.5], np.float32), 0.5, np.full((3, 84, 84), k + 1, np.uint8), False,
                  k == 29)
        w.close()
        assert srv.counters["records_in"] == 31
        src = RemoteSource(ctx, cfg, 0, s)
        assert src.ready(10)
        b = src.sample(8, None, src.allocate(8, pinned=False))
        assert b.obs.shape == (8, 3, 3, 84, 84) and b.action.shape == (8, 1) and b.action.dtype == np.float32
        newest = b.obs[:, -1, 0, 0, 0].astype(np.float32)            # action k was taken on frame k
        np.testing.assert_allclose(b.action[:, 0], (newest / 30 - 0.5), atol=1e-6)
        src.close()
        hdr = P.Header(P.Cmd.REPLAY_ADD, shard=0, client=0, seq=1, incarnation=99, dtype=P.Dtype.RAW)
        for bad in (np.nan, 1.5, -3.0):
            rec = np.zeros(2, s.wire_dtype())
            rec["kind"] = [START, ADD]
            rec["action"][1] = bad
            status, _ = ask(ctx, cfg, 0, hdr, rec.tobytes())
            assert status == P.Status.BAD_PAYLOAD
        assert srv.rejections.total == 3 and srv.counters["records_in"] == 31   # nothing half-applied
        src = RemoteSource(ctx, cfg, 0, s)
        assert src.sample(4, None, src.allocate(4, pinned=False)).action.shape == (4, 1)   # still serving
        src.close()
    finally:
        srv.request_stop()
        t.join(10)


@pytest.fixture
def pserver(make_cfg, ctx):
    """Two prioritized replay shards (agent.prioritized=true, alpha 0.5, eps 0.01)."""
    yield from running_shards(make_cfg(*CARTPOLE, "agent.prioritized=true", "agent.priority_alpha=0.5",
                                       "agent.priority_eps=0.01", "run.run_id=prioritized"), ctx)


def _fill_both(ctx, cfg, steps=40):
    for actor in (0, 1):
        w = ReplayWriter(ctx, cfg, actor, spec(cfg))
        w.start_episode(np.zeros(4, np.float32), lane=0)
        for t in range(steps):
            w.add(t % 2, 1.0, np.full(4, t + 1, np.float32), False, False, lane=0)
        w.close()


def test_prioritized_samples_carry_weights_and_priorities_go_back_to_the_shard_that_served_them(pserver, ctx):
    from gorila_zmq.replay.records import PRIORITY
    cfg, servers = pserver
    _fill_both(ctx, cfg)
    src = RemoteSource(ctx, cfg, 0, spec(cfg))
    src.beta = 0.5
    assert src.ready(20)
    for _ in range(2):                               # shard 0, then shard 1
        b = src.sample(8, None, src.allocate(8, pinned=False))
        sv = servers[b.shard]
        assert (b.next_obs[:, 0] == b.obs[:, 0] + 1).all()
        assert np.array_equal(b.obs[:, 0], b.position)          # frame t sits at position t here
        assert np.allclose(b.weight, 1.0)                       # every priority is still the initial 1
        td = np.linspace(0.0, 3.0, 8).astype(np.float32)
        src.write_back(b, td)
        src.refresh()                                           # the sampling thread sends it
        assert np.allclose(sv.pr.tree.get(b.index), (td.astype(np.float64) + 0.01) ** 0.5)
        assert sv.pr.counters["priority_updates"] == 8
    assert src.priority_stats()["priority_updates_sent"] == 2
    b = src.sample(64, None, src.allocate(64, pinned=False))    # shard 0 again: weights now differ
    p = servers[b.shard].pr.tree.get(b.index)
    assert np.allclose(b.weight, (p / p.min()) ** -0.5, rtol=1e-5)     # over the batch (the default)
    # a priority for a position the ring no longer holds is ignored, and the reply counts it
    rec = np.zeros(1, PRIORITY)
    rec["index"], rec["position"], rec["td_abs"] = 5, 5 + 2000, 1.0
    hdr = P.Header(P.Cmd.REPLAY_PRIORITY, shard=0, client=9, dtype=P.Dtype.RAW)
    rh, body = ask(ctx, cfg, 0, hdr, rec.tobytes())
    assert P.as_json(rh, body) == {"applied": 0, "stale": 1}
    src.close()


def test_bad_priority_updates_are_refused_counted_and_change_nothing(pserver, server, ctx):
    from gorila_zmq.replay.records import PRIORITY
    cfg, servers = pserver
    _fill_both(ctx, cfg, steps=10)
    before = servers[0].pr.tree.get(np.arange(2000)).copy()

    def update(idx, pos, td, nbytes=None, to=(cfg, 0)):
        rec = np.zeros(len(idx), PRIORITY)
        rec["index"], rec["position"], rec["td_abs"] = idx, pos, td
        raw = rec.tobytes()[:nbytes]
        return ask(ctx, to[0], to[1], P.Header(P.Cmd.REPLAY_PRIORITY, shard=to[1], client=9, dtype=P.Dtype.RAW), raw)[0]
    assert update([3, 2000], [3, 4], [1.0, 1.0]) == P.Status.BAD_PAYLOAD          # an index out of range
    assert update([3, 4], [3, 4], [1.0, np.nan]) == P.Status.BAD_PAYLOAD         # not finite
    assert update([3, 4], [3, 4], [1.0, -2.0]) == P.Status.BAD_PAYLOAD           # negative
    assert update([3, 4], [3, 4], [1.0, 1.0], nbytes=30) == P.Status.BAD_SIZE    # a partial record
    assert np.array_equal(servers[0].pr.tree.get(np.arange(2000)), before)       # all or nothing
    assert servers[0].pr.counters["priority_updates"] == 0
    rh, body = ask(ctx, cfg, 0, P.Header(P.Cmd.STATS, shard=0))
    assert P.as_json(rh, body)["rejected_total"] == 4
    # a uniform request to a prioritized shard, and the reverse: refused, named
    assert ask(ctx, cfg, 0, P.Header(P.Cmd.REPLAY_SAMPLE, shard=0), {"batch": 4})[0] == P.Status.BAD_PAYLOAD
    ucfg, _ = server
    assert ask(ctx, ucfg, 0, P.Header(P.Cmd.REPLAY_SAMPLE, shard=0), {"batch": 4, "beta": 0.5})[0] == P.Status.BAD_PAYLOAD
    assert update([3], [3], [1.0], to=(ucfg, 0)) == P.Status.BAD_COMMAND


def test_actor_priorities_reach_the_tree_and_bad_ones_are_refused(pserver, ctx):
    """Ape-X: a step record's has_priority/priority set the transition's initial priority on a
    prioritized shard; a flag not 0/1, or a priority not finite and >= 0, refuses the whole batch."""
    cfg, servers = pserver
    hdr = lambda seq: P.Header(P.Cmd.REPLAY_ADD, shard=0, client=0, seq=seq, incarnation=3, dtype=P.Dtype.RAW)
    rec = np.frombuffer(records(cfg, 6), spec(cfg).wire_dtype()).copy()
    rec["has_priority"][1:4], rec["priority"][1:4] = 1, [0.0, 2.0, 6.0]     # steps 1-3 carry one; 4, 5 none
    assert ask(ctx, cfg, 0, hdr(1), rec.tobytes())[0].command == P.Cmd.REPLY
    sv = servers[0]
    sv.pr.sync()
    # step record t completes the transition whose obs ends at slot t - 1
    assert np.allclose(sv.pr.tree.get([0, 1, 2]), (np.array([0.0, 2.0, 6.0]) + 0.01) ** 0.5)
    assert np.allclose(sv.pr.tree.get([3, 4]), 1.0)     # none given: the max as the sync began (empty: 1)
    assert sv.counters["initial_priorities"] == 3
    for field, value, status in (("has_priority", 2, P.Status.BAD_PAYLOAD), ("priority", np.nan, P.Status.BAD_PAYLOAD),
                                 ("priority", -1.0, P.Status.BAD_PAYLOAD)):
        bad = rec.copy()
        bad["kind"][0] = ADD
        bad["has_priority"][2] = 1
        bad[field][2] = value
        before = sv.counters["records_in"]
        assert ask(ctx, cfg, 0, hdr(2), bad.tobytes())[0] == status
        assert sv.counters["records_in"] == before                        # nothing applied
