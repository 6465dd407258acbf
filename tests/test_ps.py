"""A parameter-server shard on real sockets, served from a thread of the test process."""
import os
import threading
import time

import numpy as np
import pytest
import zmq

from conftest import SMALL_MLP, wait_for
from gorila_zmq.ps import optim
from gorila_zmq.net import protocol as P
from gorila_zmq.ps.client import GradientPusher, ShardSet, fetch_params
from gorila_zmq.ps.subscriber import ParamSubscriber
from gorila_zmq.net.rpc import request
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.agents.base import build_network
from gorila_zmq.roles.ps import ParameterServerShard, load_checkpoint, save_checkpoint


class Running:
    """Shards served by threads; stopped and released at the end of the test."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        m = build_network(cfg)
        self.layout = ParamLayout.from_module(m)
        self.theta0 = self.layout.flatten(m)
        self.shards = [ParameterServerShard(cfg, i, ctx, self.layout, self.theta0) for i in range(cfg.ps.shards)]
        self.threads = [threading.Thread(target=s.run, daemon=True) for s in self.shards]
        for t in self.threads:
            t.start()
        self.set = ShardSet(cfg, self.layout)

    def stop(self):
        for s in self.shards:
            s.request_stop()
        for t in self.threads:
            t.join(10)
        for s in self.shards:
            s.close()


@pytest.fixture
def running(make_cfg, ctx):
    made = []

    def start(*overrides):
        r = Running(make_cfg(*SMALL_MLP, *overrides), ctx)
        made.append(r)
        return r
    yield start
    for r in made:
        r.stop()


def raw(ctx, endpoint, frames, timeout=2.0):
    """Send arbitrary frames on a fresh DEALER; the reply frames, or None."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart(frames)
        if s.poll(int(timeout * 1000)):
            return s.recv_multipart()
        return None
    finally:
        s.close()


def reply_status(frames):
    hdr, _ = P.parse(frames)
    return hdr.command, P.Status(hdr.status)


def push_one(ctx, r, shard, grad_slice, pversion, client=1, seq=1):
    hdr = P.Header(P.Cmd.PUSH_GRAD, shard=shard, client=client, seq=seq, pversion=pversion, layout=r.layout.hash)
    return reply_status(raw(ctx, r.set.req[shard], P.message(hdr, grad_slice)))


def test_hello_checks_layout(running, ctx):
    r = running()
    info = r.set.hello(ctx, 0)
    assert info["n_params"] == r.layout.size and info["version"] == 0
    other = ShardSet(r.cfg, ParamLayout([("w", (r.layout.size,), "float32")]))
    with pytest.raises(P.ProtocolError, match="different models") as e:
        other.hello(ctx, 0)
    assert e.value.status == P.Status.BAD_LAYOUT


def test_staleness_boundary(running, ctx):
    r = running("ps.max_staleness=3")
    n = r.layout.size
    g = np.full(n, 0.01, np.float32)
    for k in range(5):                            # version -> 5
        assert push_one(ctx, r, 0, g, pversion=k, seq=k + 1) == (P.Cmd.REPLY, P.Status.APPLIED)
    before = r.shards[0].state.theta.copy()
    # staleness = 5 - 1 = 4 > 3: discarded, theta untouched
    assert push_one(ctx, r, 0, g, pversion=1, seq=100) == (P.Cmd.REPLY, P.Status.STALE)
    assert np.array_equal(r.shards[0].state.theta, before)
    # staleness = 5 - 2 = 3 == max: applied
    assert push_one(ctx, r, 0, g, pversion=2, seq=101) == (P.Cmd.REPLY, P.Status.APPLIED)
    st = r.set.stats(ctx, 0)
    assert st["discarded_stale"] == 1 and st["updates_applied"] == 6 and st["version"] == 6


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_rejected_theta_unchanged(running, ctx, bad):
    r = running()
    g = np.full(r.layout.size, 0.01, np.float32)
    g[len(g) // 2] = bad
    before = r.shards[0].state.theta.copy()
    acc = r.shards[0].state.accum.copy()
    assert push_one(ctx, r, 0, g, 0) == (P.Cmd.ERROR, P.Status.NON_FINITE)
    assert np.array_equal(r.shards[0].state.theta, before)
    assert np.array_equal(r.shards[0].state.accum, acc)
    st = r.set.stats(ctx, 0)
    assert st["rejected"] == {"NON_FINITE": 1} and st["version"] == 0


def _malformed(r):
    L, n = r.layout, r.layout.size
    ok = P.Header(P.Cmd.PUSH_GRAD, shard=0, seq=1, layout=L.hash)
    good = P.message(ok, np.zeros(n, np.float32))
    hdr = good[0]
    return {
        "random_bytes": ([os.urandom(100)], P.Status.BAD_HEADER),
        "empty_frame": ([b""], P.Status.BAD_HEADER),
        "truncated_header": ([hdr[:20]], P.Status.BAD_HEADER),
        "truncated_payload": ([hdr, np.zeros(n, np.float32).tobytes()[:1000]], P.Status.BAD_SIZE),
        "wrong_magic": ([b"ZZ" + hdr[2:], good[1]], P.Status.BAD_MAGIC),
        "wrong_protocol_version": ([hdr[:2] + b"\x09" + hdr[3:], good[1]], P.Status.BAD_VERSION),
        "unknown_command": ([hdr[:3] + b"\xee" + hdr[4:], good[1]], P.Status.BAD_COMMAND),
        "wrong_payload_size": (P.message(P.Header(P.Cmd.PUSH_GRAD, shard=0, layout=L.hash),
                                         np.zeros(n - 1, np.float32)), P.Status.BAD_SIZE),
        "wrong_dtype": (P.message(P.Header(P.Cmd.PUSH_GRAD, shard=0, layout=L.hash),
                                  np.zeros(n, np.int64)[: n // 2]), P.Status.BAD_DTYPE),
        "wrong_layout_hash": (P.message(P.Header(P.Cmd.PUSH_GRAD, shard=0, layout=L.hash ^ 1),
                                        np.zeros(n, np.float32)), P.Status.BAD_LAYOUT),
        "oversized": (P.message(P.Header(P.Cmd.PUSH_GRAD, shard=0, layout=L.hash),
                                np.zeros(n + 10, np.float32)), P.Status.OVERSIZED),
        "wrong_shard": (P.message(P.Header(P.Cmd.PUSH_GRAD, shard=5, layout=L.hash),
                                  np.zeros(n, np.float32)), P.Status.BAD_SHARD),
        "too_many_frames": (good + [b"extra"], P.Status.BAD_FRAMES),
        "command_not_served": (P.message(P.Header(P.Cmd.PARAMS, shard=0, layout=L.hash)), P.Status.BAD_COMMAND),
        "hello_hash_not_int": (P.message(P.Header(P.Cmd.HELLO, shard=0), {"layout_hash": "abc"}), P.Status.BAD_PAYLOAD),
        "bad_hello_json": ([P.Header(P.Cmd.HELLO, shard=0, dtype=P.Dtype.JSON, length=4).pack(), b"\xff\xfe{]"],
                           P.Status.BAD_PAYLOAD),
    }


def test_every_malformed_request_is_counted_answered_and_harmless(running, ctx):
    r = running()
    cases = _malformed(r)
    theta = r.shards[0].state.theta.copy()
    for name, (frames, status) in cases.items():
        rep = raw(ctx, r.set.req[0], frames)
        assert rep is not None, f"{name}: no error reply"
        assert reply_status(rep) == (P.Cmd.ERROR, status), name
        # the shard still answers, and theta is untouched
        assert r.set.stats(ctx, 0)["version"] == 0, name
    assert np.array_equal(r.shards[0].state.theta, theta)
    st = r.set.stats(ctx, 0)
    assert st["rejected_total"] == len(cases)
    # and real work still goes through afterwards
    g = np.full(r.layout.size, 0.01, np.float32)
    assert push_one(ctx, r, 0, g, 0) == (P.Cmd.REPLY, P.Status.APPLIED)


def test_payload_beyond_maxmsgsize_drops_only_that_peer(running, ctx):
    r = running()
    limit = 4 * r.layout.size * r.cfg.ps.max_payload_factor + 65536   # bytes: ZeroMQ refuses more
    huge = np.zeros(int(limit // 4) + 1000, np.float32)
    rep = raw(ctx, r.set.req[0], P.message(P.Header(P.Cmd.PUSH_GRAD, shard=0, layout=r.layout.hash), huge), 1.0)
    assert rep is None
    assert r.set.stats(ctx, 0)["version"] == 0


def test_retried_push_is_applied_once(running, ctx):
    r = running()
    g = np.full(r.layout.size, 0.01, np.float32)
    assert push_one(ctx, r, 0, g, 0, client=9, seq=4) == (P.Cmd.REPLY, P.Status.APPLIED)
    theta = r.shards[0].state.theta.copy()
    # the retry gets the first outcome back, and nothing is applied twice
    assert push_one(ctx, r, 0, g, 0, client=9, seq=4) == (P.Cmd.REPLY, P.Status.APPLIED)
    assert np.array_equal(r.shards[0].state.theta, theta)
    st = r.set.stats(ctx, 0)
    assert st["updates_applied"] == 1 and st["duplicates"] == 1


def test_pusher_accounts_every_reply_and_theta_matches_serial_adagrad(running, ctx):
    r = running("ps.shards=2", "net.in_flight=3", "ps.max_staleness=1000")
    p = GradientPusher(ctx, r.set, record=True)
    rng = np.random.default_rng(0)
    grads = {}
    for k in range(30):
        g = rng.standard_normal(r.layout.size).astype(np.float32) * 0.1
        seq = p.push(g, p.versions)
        grads[seq] = g
    assert p.flush(10)
    assert p.stats.applied == 60 and p.stats.lost == 0 and p.stats.rejected == 0
    theta, versions = fetch_params(ctx, r.set)
    assert versions == [30, 30]
    ref = r.theta0.copy()
    acc = np.full_like(ref, r.cfg.ps.initial_accumulator)
    for i, (a, b) in enumerate(r.set.ranges):
        order = [seq for shard, seq, v in sorted((e for e in p.applied_log if e[0] == i), key=lambda e: e[2])]
        for seq in order:
            optim.adagrad_update_numpy(ref[a:b], acc[a:b], grads[seq][a:b], r.cfg.ps.lr, r.cfg.ps.eps)
    np.testing.assert_allclose(theta, ref, rtol=1e-5, atol=1e-6)
    p.close()


def test_late_subscriber_gets_snapshot_then_updates(running, ctx):
    r = running("ps.shards=2", "ps.broadcast_every=1")
    p = GradientPusher(ctx, r.set)
    g = np.full(r.layout.size, 0.01, np.float32)
    for _ in range(7):
        p.push(g.copy(), p.versions)
    assert p.flush(10)
    sub = ParamSubscriber(ctx, r.set)
    try:
        assert sub.wait_ready(10)
        theta, versions, _ = sub.latest()
        ref, ref_versions = fetch_params(ctx, r.set)
        assert versions == ref_versions == [7, 7]
        assert np.array_equal(theta, ref)            # consistent snapshot
        for _ in range(3):
            p.push(g.copy(), p.versions)
        assert p.flush(10)
        wait_for(lambda: sub.latest()[1] == [10, 10], 10, what="broadcasts of the later updates")
        ref, _ = fetch_params(ctx, r.set)
        assert np.array_equal(sub.latest()[0], ref)
        assert sub.counters["broadcasts"] >= 2 and sub.global_version == 10
    finally:
        sub.close()
        p.close()


def test_subscriber_marks_silent_shard_dead_and_recovers(make_cfg, ctx):
    cfg = make_cfg(*SMALL_MLP, "net.heartbeat_interval_s=0.2")
    m = build_network(cfg)
    L = ParamLayout.from_module(m)
    th0 = L.flatten(m)
    s1 = ParameterServerShard(cfg, 0, ctx, L, th0)
    t1 = threading.Thread(target=s1.run, daemon=True)
    t1.start()
    sub = ParamSubscriber(ctx, ShardSet(cfg, L))
    try:
        assert sub.wait_ready(10) and sub.alive[0]
        inc1 = sub.incarnations[0]
        s1.request_stop()
        t1.join(5)
        s1.close()
        wait_for(lambda: not sub.alive[0], 5, what="dead shard detection")
        s2 = ParameterServerShard(cfg, 0, ctx, L, th0)
        t2 = threading.Thread(target=s2.run, daemon=True)
        t2.start()
        try:
            wait_for(lambda: sub.alive[0] and sub.incarnations[0] == s2.incarnation, 15, what="reconnect")
            assert sub.incarnations[0] != inc1 and sub.counters["dead_events"] >= 1
        finally:
            s2.request_stop()
            t2.join(5)
            s2.close()
    finally:
        sub.close()


def test_checkpoint_resume_in_process(make_cfg, ctx):
    cfg = make_cfg(*SMALL_MLP)
    r = Running(cfg, ctx)
    g = np.full(r.layout.size, 0.01, np.float32)
    p = GradientPusher(ctx, r.set)
    for _ in range(4):
        p.push(g.copy(), p.versions)
    assert p.flush(10)
    p.close()
    r.stop()                                           # writes the final checkpoint
    r2 = Running(cfg, ctx)
    try:
        assert r2.shards[0].state.version == 4
        assert r2.shards[0].counters["resumed_from"] == "checkpoint"
        assert not np.array_equal(r2.shards[0].state.theta, r.theta0)
    finally:
        r2.stop()


def test_checkpoint_interrupted_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt" / "ps0.npz")
    a = np.arange(1000, dtype=np.float32)
    save_checkpoint(path, a, a * 2, {"version": 1})

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full (simulated crash mid-write)")
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, a + 1, a, {"version": 2})
    theta, (accum,), meta = load_checkpoint(path)
    assert meta["version"] == 1 and np.array_equal(theta, a) and np.array_equal(accum, a * 2)
    assert os.listdir(os.path.dirname(path)) == ["ps0.npz"]          # the partial file is gone


def test_periodic_checkpoint_is_written_in_the_background_while_pushes_are_answered(make_cfg, ctx, monkeypatch):
    """The serving loop snapshots theta, optimiser state and dedup table, and a thread writes them: a
    push is answered while the write is held up, and the file then holds the snapshot's version."""
    from gorila_zmq.roles import ps as ps_mod
    real_save, entered, release = ps_mod.save_checkpoint, threading.Event(), threading.Event()

    def held_save(path, theta, states, meta, dedup=None):
        entered.set()
        assert release.wait(30)
        real_save(path, theta, states, meta, dedup)
    monkeypatch.setattr(ps_mod, "save_checkpoint", held_save)
    r = Running(make_cfg(*SMALL_MLP, "ps.checkpoint_interval_s=0.2"), ctx)
    try:
        assert entered.wait(10), "no periodic checkpoint started"
        shard = r.shards[0]
        v0 = shard.state.version
        g = np.full(r.layout.size, 0.01, np.float32)
        assert push_one(ctx, r, 0, g, v0) == (P.Cmd.REPLY, P.Status.APPLIED)     # answered mid-write
        assert shard.state.version == v0 + 1 and shard.counters["checkpoints"] == 0
        release.set()
        wait_for(lambda: shard.counters["checkpoints"] >= 1, 10, what="the checkpoint write")
        _, _, meta = load_checkpoint(shard.ckpt_path)
        assert meta["version"] >= v0                 # the snapshot's version (a later one may follow)
    finally:
        release.set()
        r.stop()
    _, _, meta = load_checkpoint(r.shards[0].ckpt_path)
    assert meta["version"] == v0 + 1                 # the final checkpoint at stop has the push


def test_failed_background_checkpoint_is_counted_and_the_shard_serves_on(make_cfg, ctx, monkeypatch):
    from gorila_zmq.roles import ps as ps_mod

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device (simulated)")
    r = Running(make_cfg(*SMALL_MLP, "ps.checkpoint_interval_s=0.1"), ctx)
    monkeypatch.setattr(ps_mod, "save_checkpoint", full_disk)
    try:
        shard = r.shards[0]
        wait_for(lambda: shard.counters["checkpoint_errors"] >= 2, 10, what="failed checkpoint writes")
        g = np.full(r.layout.size, 0.01, np.float32)
        assert push_one(ctx, r, 0, g, shard.state.version) == (P.Cmd.REPLY, P.Status.APPLIED)
        assert r.threads[0].is_alive()
    finally:
        monkeypatch.undo()
        r.stop()


def test_a_given_up_push_never_has_its_buffer_reused(running, make_cfg, ctx):
    """An answered push frees its gradient buffer for the learner's next update. A push given up on a
    dead shard never does: libzmq may still be reading the zero-copy frames of the closed socket, so
    the learner drops that buffer and takes a fresh one."""
    from types import SimpleNamespace
    import torch
    from gorila_zmq.roles.learner import Learner
    r = running()
    n = r.layout.size

    def pool_take(pusher, entries):
        me = SimpleNamespace(_grad_bufs=list(entries), pusher=pusher, staging=None, layout=r.layout)
        got, _ = Learner._free_grad_buffer(me)
        return got, me._grad_bufs

    live = GradientPusher(ctx, r.set)
    g_live = np.full(n, 1e-3, np.float32)
    s_live = live.push(g_live, live.versions)
    assert live.flush(10) and live.stats.applied == 1
    got, left = pool_take(live, [(s_live, g_live, torch.from_numpy(g_live))])
    assert got is g_live and left == []

    dead_cfg = make_cfg(*SMALL_MLP, "net.request_timeout_s=0.1", "net.request_retries=1")    # nothing serves it
    dead = GradientPusher(ctx, ShardSet(dead_cfg, r.layout), hello=False)
    g_dead, g_busy = np.zeros(n, np.float32), np.zeros(n, np.float32)
    s_dead = dead.push(g_dead, [0])
    assert dead.reusable(s_dead) is None                     # still in flight
    wait_for(lambda: dead.poll(0.05) or dead.answered(s_dead), 10, what="the push to be given up")
    assert dead.stats.lost == 1 and dead.stats.retries == 1
    s_busy = dead.push(g_busy, [0])
    busy = (s_busy, g_busy, torch.from_numpy(g_busy))
    got, left = pool_take(dead, [(s_dead, g_dead, torch.from_numpy(g_dead)), busy])
    assert got is not g_dead and got is not g_busy and got.shape == (n,) and got.dtype == np.float32
    assert left == [busy]                                    # the given-up buffer left the pool for good
    assert dead.reusable(s_dead) is False and dead.reusable(s_dead) is False    # and stays unsafe
    live.close()
    dead.close()


def test_lazy_pirate_gives_up_on_a_dead_endpoint(ctx, make_cfg):
    from gorila_zmq.net.rpc import Unavailable
    from conftest import free_base_port
    port = free_base_port(1)
    with pytest.raises(Unavailable, match="after 2 attempts"):
        request(ctx, f"tcp://127.0.0.1:{port}", P.Header(P.Cmd.STATS), timeout_s=0.2, retries=1)


def test_adam_shard_matches_serial_adam_and_resumes(make_cfg, ctx):
    cfg = make_cfg(*SMALL_MLP, "ps.optimizer=adam", "ps.lr=0.001", "ps.max_staleness=1000")
    r = Running(cfg, ctx)
    try:
        p = GradientPusher(ctx, r.set)
        rng = np.random.default_rng(3)
        grads = [rng.standard_normal(r.layout.size).astype(np.float32) for _ in range(5)]
        for g in grads:
            p.push(g, p.versions)
            assert p.flush(10)                      # one at a time: the order is the push order
        p.close()
        ref, m, v = r.theta0.copy(), np.zeros_like(r.theta0), np.zeros_like(r.theta0)
        for t, g in enumerate(grads, 1):
            optim.adam_update_numpy(ref, m, v, g, 0.9, 0.999, 0.001 / (1 - 0.9 ** t), 1 / (1 - 0.999 ** t) ** 0.5, 1e-8)
        np.testing.assert_allclose(fetch_params(ctx, r.set)[0], ref, rtol=1e-5, atol=1e-7)
    finally:
        r.stop()
    r2 = Running(cfg, ctx)
    try:
        assert r2.shards[0].state.version == 5 and np.allclose(r2.shards[0].state.states[0], m, atol=1e-7)
    finally:
        r2.stop()
    # a checkpoint of one optimiser never feeds another
    cfg.ps.optimizer = "adagrad"
    with pytest.raises(RuntimeError, match="adam state"):
        Running(cfg, ctx)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_half_width_gradients_are_widened_and_applied_in_float32(running, ctx, wire):
    """net.grad_dtype: the pusher narrows, the shard widens exactly and applies in float32: theta moves
    as it does for the float32 gradient of the same (rounded) values; half the bytes travel."""
    import torch
    narrow = running(f"net.grad_dtype={wire}", "ps.max_staleness=1000")
    wide = running("ps.max_staleness=1000", f"run.run_dir={narrow.cfg.run.run_dir}-wide")
    g = (np.random.default_rng(1).standard_normal(narrow.layout.size) * 1e-2).astype(np.float32)
    rounded = torch.from_numpy(g).to(getattr(torch, wire)).float().numpy()
    assert not np.array_equal(rounded, g)                    # the narrowing did something
    p16 = GradientPusher(ctx, narrow.set)
    p32 = GradientPusher(ctx, wide.set)
    p16.push(g, p16.versions)
    p32.push(rounded, p32.versions)
    assert p16.flush(10) and p32.flush(10)
    assert p16.stats.applied == p32.stats.applied == 1
    assert np.array_equal(narrow.shards[0].state.theta, wide.shards[0].state.theta)
    assert p16.bytes_sent * 2 == p32.bytes_sent


def test_non_finite_half_gradient_is_refused(running, ctx):
    r = running("net.grad_dtype=bfloat16")
    g = np.zeros(r.layout.size, np.float32)
    g[3] = np.nan
    before = r.shards[0].state.theta.copy()
    p = GradientPusher(ctx, r.set)
    p.push(g, p.versions)
    p.flush(10)
    assert p.stats.rejected == 1 and p.stats.applied == 0
    assert np.array_equal(r.shards[0].state.theta, before)


def test_age_bound_discards_a_gradient_whose_theta_went_out_of_date_long_ago(running, ctx):
    """ps.max_staleness_s: the time since the theta a gradient was computed against stopped being the
    newest; the count bound off (0) lets any number of updates pass meanwhile."""
    r = running("ps.max_staleness=0", "ps.max_staleness_s=0.5")
    g = np.full(r.layout.size, 0.01, np.float32)
    for k in range(200):                                      # many updates, quickly: all young
        assert push_one(ctx, r, 0, g, pversion=0 if k < 100 else k, seq=k + 1)[1] == P.Status.APPLIED
    time.sleep(0.7)                    # the bound is time itself: this test waits on the clock
    # theta at version 150 was superseded 0.7 s ago: too old; the current version is still welcome
    assert push_one(ctx, r, 0, g, pversion=150, seq=1000) == (P.Cmd.REPLY, P.Status.STALE)
    assert push_one(ctx, r, 0, g, pversion=r.shards[0].state.version, seq=1001)[1] == P.Status.APPLIED
    st = r.set.stats(ctx, 0)
    assert st["discarded_stale"] == 1 and sum(st["age_ms"].values()) == 202


def test_broadcast_rate_cap(running, ctx):
    """ps.broadcast_min_interval_ms bounds a shard's broadcasts whatever its update rate."""
    r = running("ps.broadcast_every=1", "ps.broadcast_min_interval_ms=200", "ps.max_staleness=0")
    g = np.full(r.layout.size, 0.01, np.float32)
    p = GradientPusher(ctx, r.set)
    t0 = time.monotonic()
    b0 = r.shards[0].counters["broadcasts"]
    while time.monotonic() - t0 < 1.0:
        p.push(g, p.versions)
        p.poll(0.01)
    p.flush(10)
    sent = r.shards[0].counters["broadcasts"] - b0
    assert p.stats.applied > 20 and 2 <= sent <= 7, (p.stats.applied, sent)


def test_staleness_factor_bounds_the_age_by_what_this_layout_calls_honest(running, ctx):
    """ps.staleness_factor: the bound is that many times the median age of the latest gradients, so it
    needs no tuning per layout; a gradient many honest ages old is refused."""
    r = running("ps.max_staleness=0", "ps.staleness_factor=4")
    g = np.full(r.layout.size, 0.01, np.float32)
    shard = r.shards[0]
    for k in range(80):                       # honest: computed against the previous version, ~10 ms old
        time.sleep(0.01)
        assert push_one(ctx, r, 0, g, pversion=max(0, shard.state.version - 1), seq=k + 1)[1] == P.Status.APPLIED
    assert 0.0 < shard._age_bound() < 0.3
    # theta of 60 updates ago stopped being the newest ~0.6 s ago: far past 4 x ~10 ms
    assert push_one(ctx, r, 0, g, pversion=shard.state.version - 60, seq=500) == (P.Cmd.REPLY, P.Status.STALE)
    assert push_one(ctx, r, 0, g, pversion=shard.state.version, seq=501)[1] == P.Status.APPLIED


def test_a_same_host_push_names_its_shared_memory_buffer_and_theta_moves_as_over_a_socket(running, ctx):
    """net.shm_push=auto: a shard whose HELLO names this host's /dev/shm reads the pusher's buffer in
    place; the message is a 88-byte reference, and theta moves exactly as for the same gradient's bytes
    sent over the socket (net.shm_push=off)."""
    shm_r = running("ps.shards=2", "ps.max_staleness=1000", "net.shm_push=auto")
    sock_r = running("ps.shards=2", "ps.max_staleness=1000", "net.shm_push=off",
                     f"run.run_dir={shm_r.cfg.run.run_dir}-off")
    g = (np.random.default_rng(2).standard_normal(shm_r.layout.size) * 1e-2).astype(np.float32)
    p, q = GradientPusher(ctx, shm_r.set), GradientPusher(ctx, sock_r.set)
    try:
        assert p.local == {0, 1} and q.local == set() and q.segments is None
        buf = p.segments.new()
        buf[:] = g
        for _ in range(2):
            p.push(buf, p.versions)
            q.push(g, q.versions)
            assert p.flush(10) and q.flush(10)
        assert p.stats.applied == q.stats.applied == 4 and p.stats.local == 4 and q.stats.local == 0
        assert p.bytes_sent == 4 * P.SHM_REF_RECORD.size and q.bytes_sent == 2 * g.nbytes
        assert [s.counters["shm_pushes"] for s in shm_r.shards] == [2, 2]
        assert [s.counters["shm_pushes"] for s in sock_r.shards] == [0, 0]
        for a, b in zip(shm_r.shards, sock_r.shards):
            assert np.array_equal(a.state.theta, b.state.theta)
        assert not np.array_equal(shm_r.shards[0].state.theta, shm_r.theta0[:shm_r.shards[0].size])
        # a plain array (not one of the segments) still goes over the socket
        p.push(g, p.versions)
        assert p.flush(10) and p.stats.local == 4 and p.bytes_sent == 4 * P.SHM_REF_RECORD.size + g.nbytes
    finally:
        p.close()
        q.close()


def test_a_bad_shared_memory_reference_is_counted_refused_and_theta_unchanged(running, ctx):
    """Whatever a SHM_REF names (another segment of the run, a missing one, a range outside it, the
    wrong count, a NaN in the buffer), the shard answers an ERROR, counts it, leaves theta alone and
    serves on; a shard with net.shm_push=off refuses every such push."""
    from gorila_zmq.host import shm
    from gorila_zmq.ps.local import GradientSegments
    r = running("ps.max_staleness=1000", "net.shm_push=auto")
    s = r.shards[0]
    segs = GradientSegments(r.cfg.run_id, 7, r.layout.size)
    buf = segs.new()
    buf[:] = 0.01
    name = segs.ref(buf)
    before = s.state.theta.copy()

    def ref_push(payload, seq, shard_r=r):
        hdr = P.Header(P.Cmd.PUSH_GRAD, shard=0, client=7, seq=seq, layout=shard_r.layout.hash, dtype=P.Dtype.SHM_REF)
        return reply_status(raw(ctx, shard_r.set.req[0], P.message(hdr, payload)))

    n = r.layout.size
    bad = [P.shm_ref(f"gz_{r.cfg.run_id}_ps0", 0, n),                 # the shard's own state: not a gradient buffer
           P.shm_ref(f"gz_{r.cfg.run_id}_grad00000007_99", 0, n),     # no such segment
           P.shm_ref(name, 4, n),                                      # runs past the segment's end
           P.shm_ref(name, 2, n - 1),                                  # not float32-aligned (and short)
           P.shm_ref(name, 0, n + 1),                                  # the wrong count
           P.shm_ref(name, 0, n)[:-1],                                 # a truncated reference
           P.shm_ref("gz_x/../" + name, 0, n)]
    try:
        for k, payload in enumerate(bad):
            assert ref_push(payload, k + 1)[0] == P.Cmd.ERROR, k
        assert np.array_equal(s.state.theta, before) and s.state.version == 0
        buf[3] = np.nan
        assert ref_push(P.shm_ref(name, 0, n), 100) == (P.Cmd.ERROR, P.Status.NON_FINITE)
        assert np.array_equal(s.state.theta, before)
        assert s.stats()["rejected_total"] == len(bad) + 1
        buf[3] = 0.01
        assert ref_push(P.shm_ref(name, 0, n), 101) == (P.Cmd.REPLY, P.Status.APPLIED)
        assert s.state.version == 1 and s.counters["shm_pushes"] == 2     # read in place: the NaN one and this
        off = running("ps.max_staleness=1000", "net.shm_push=off", f"run.run_dir={r.cfg.run.run_dir}-off")
        assert off.shards[0].describe()["host"] == ""
        assert ref_push(P.shm_ref(name, 0, n), 1, off) == (P.Cmd.ERROR, P.Status.BAD_DTYPE)
        assert off.shards[0].state.version == 0
    finally:
        segs.close()
    assert name not in shm.segments(f"gz_{r.cfg.run_id}_")
