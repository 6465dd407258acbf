"""What a shard keeps and refuses: the bounded dedup table (at most once beyond any number of clients),
its shared-memory segment re-adopted after a death, a torn apply falling back to the checkpoint,
gradients from the future, and JSON fields that Python would choke on. Shards are driven in this
process (no thread: each test steps the serving loop itself), on real sockets."""
import io
import logging

import numpy as np
import pytest
import zmq

from conftest import SMALL_MLP
from gorila_zmq.agents.base import build_network
from gorila_zmq.net import protocol as P, topology
from gorila_zmq.ps import optim
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.ps.state import DEDUP_ROW, DEDUP_WINDOW, DedupTable
from gorila_zmq.roles.ps import ParameterServerShard


class Driven:
    """One shard, stepped by the test: send() returns the reply's (command, status)."""

    def __init__(self, cfg, ctx, layout=None, theta0=None):
        self.cfg, self.ctx = cfg, ctx
        if layout is None:
            m = build_network(cfg)
            layout, theta0 = ParamLayout.from_module(m), ParamLayout.from_module(m).flatten(m)
        self.layout, self.theta0 = layout, theta0
        self.shard = ParameterServerShard(cfg, 0, ctx, layout, theta0)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(topology.ps_request(cfg, 0).connect)

    def send(self, frames):
        self.sock.send_multipart(frames)
        for _ in range(50):
            self.shard.step()
            # the reply crosses two I/O threads: wait for it here, not in the shard's next idle poll
            # (up to a heartbeat interval each)
            if self.sock.poll(200):
                hdr, _ = P.parse(self.sock.recv_multipart())
                return P.Cmd(hdr.command), P.Status(hdr.status)
        raise AssertionError("no reply")

    def push(self, grad, client=1, seq=1, pversion=None, retry=False):
        hdr = P.Header(P.Cmd.PUSH_GRAD, shard=0, client=client, seq=seq, layout=self.layout.hash,
                       pversion=self.shard.state.version if pversion is None else pversion)
        frames = P.message(hdr, grad)
        if retry:
            frames[0] = P.mark_retry(frames[0])
        return self.send(frames)

    def die(self):
        """What SIGKILL leaves: the segment, no final checkpoint."""
        self.shard.failed = True
        self.shard.close()
        self.sock.close()

    def stop(self):
        self.shard.close()
        self.sock.close()


@pytest.fixture
def driven(make_cfg, ctx):
    made = []

    def make(*overrides, layout=None, theta0=None):
        d = Driven(make_cfg(*SMALL_MLP, "ps.max_staleness=0", "ps.max_staleness_s=0", "ps.staleness_factor=0",
                            "ps.checkpoint_interval_s=0", *overrides), ctx, layout, theta0)
        made.append(d)
        return d
    yield make
    for d in made:
        if d.shard.state is not None:
            d.stop()


def grad(layout, k):
    return np.random.default_rng(k).standard_normal(layout.size).astype(np.float32) * 0.01


def serial_adagrad(cfg, theta0, grads):
    theta, acc = theta0.copy(), np.full_like(theta0, cfg.ps.initial_accumulator)
    for g in grads:
        optim.adagrad_update_numpy(theta, acc, g, cfg.ps.lr, cfg.ps.eps)
    return theta


REPLY, ERROR = P.Cmd.REPLY, P.Cmd.ERROR


# -- the dedup table ------------------------------------------------------------------------------

def test_dedup_table_remembers_a_window_per_client_and_forgets_clients_least_recently_seen():
    t = DedupTable(np.zeros(3, DEDUP_ROW))
    assert t.lookup(7, 1, retry=False) is None
    assert t.lookup(7, 1, retry=True) == P.Status.FORGOTTEN         # an unknown client's retry
    t.record(7, 1, applied=True)
    t.record(7, 2, applied=False)
    assert t.lookup(7, 1, False) == P.Status.APPLIED and t.lookup(7, 2, False) == P.Status.STALE
    assert t.lookup(7, 3, True) is None                              # never decided: may be applied
    t.record(7, 5, applied=True)                                     # 3 and 4 in flight, arrive later
    assert t.lookup(7, 4, True) is None and t.lookup(7, 1, False) == P.Status.APPLIED
    t.record(7, 5 + DEDUP_WINDOW, applied=True)
    assert t.lookup(7, 5, False) == P.Status.FORGOTTEN               # slid out of the window
    assert t.lookup(7, 6, False) is None                              # inside it, never decided
    for c in (8, 9):
        t.record(c, 1, True)
    t.record(7, 100, True)                                           # 7 seen again: 8 is now the oldest
    t.record(10, 1, True)                                            # full: 8 forgotten
    assert t.lookup(8, 1, retry=True) == P.Status.FORGOTTEN and t.lookup(9, 1, False) == P.Status.APPLIED
    assert len(t) == 3
    again = DedupTable(t.rows)                                       # rebuilt from the rows alone
    assert again.lookup(9, 1, False) == P.Status.APPLIED and again.lookup(7, 100, False) == P.Status.APPLIED


def test_a_retry_after_more_clients_than_the_table_holds_is_not_applied_again(driven):
    d = driven()
    g = grad(d.layout, 0)
    assert d.push(g, client=1, seq=1) == (REPLY, P.Status.APPLIED)
    rows = len(d.shard.state.dedup.rows)
    for c in range(rows + 44):                                        # 300 other clients push
        assert d.push(g, client=1000 + c, seq=1) == (REPLY, P.Status.APPLIED)
    v = d.shard.state.version
    assert d.push(g, client=1, seq=1, retry=True) == (ERROR, P.Status.FORGOTTEN)
    assert d.shard.state.version == v and d.shard.counters["forgotten_retries"] == 1
    # a first send (not a retry) from a forgotten client is new work and is applied
    assert d.push(g, client=1, seq=2) == (REPLY, P.Status.APPLIED)


def test_the_table_is_sized_from_the_layout(make_cfg, ctx):
    from gorila_zmq.ps.state import dedup_clients
    assert dedup_clients(make_cfg("roles.mode=global", "roles.learners=100")) == 400
    assert dedup_clients(make_cfg("roles.bundles=2")) == 256


# -- gradients from the future, and JSON fields ---------------------------------------------------

@pytest.mark.parametrize("ahead", [1, 1000, 2**64 - 1])
def test_a_gradient_computed_against_a_version_the_shard_never_reached_is_refused(driven, ahead):
    d = driven()
    g = grad(d.layout, 1)
    assert d.push(g, seq=1) == (REPLY, P.Status.APPLIED)
    before = d.shard.state.theta.copy()
    v = d.shard.state.version
    pversion = min(v + ahead, 2**64 - 1)
    assert d.push(g, seq=2, pversion=pversion) == (ERROR, P.Status.AHEAD)
    assert d.shard.state.version == v and np.array_equal(d.shard.state.theta, before)
    st = d.shard.stats()
    assert st["rejected"] == {"AHEAD": 1} and all(int(b) >= 0 for b in st["staleness"])


def test_the_pusher_asks_for_a_resnapshot_when_a_shard_says_ahead(driven):
    from gorila_zmq.ps.client import GradientPusher, ShardSet
    d = driven()
    pusher = GradientPusher(d.ctx, ShardSet(d.cfg, d.layout), hello=False)
    try:
        pusher.push(grad(d.layout, 2), [d.shard.state.version + 5])
        for _ in range(100):
            d.shard.step()
            if pusher.poll(0.01):
                break
        assert pusher.resnapshot == {0} and pusher.stats.rejected == 1 and d.shard.state.version == 0
    finally:
        pusher.close()


def _json_frames(cmd, body: bytes, shard=0):
    h = P.Header(cmd, shard=shard, dtype=P.Dtype.JSON, length=len(body))
    return [h.pack(), body]


def test_huge_json_integers_are_bad_payloads_and_log_a_bounded_amount(driven):
    d = driven()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logging.getLogger("gorila_zmq").addHandler(handler)
    try:
        for body in (b'{"layout_hash": ' + b"9" * 5000 + b"}", b'{"layout_hash": NaN}',
                     b'{"layout_hash": true}', b'{"layout_hash": -1}', b'{"layout_hash": 1.5}',
                     b'{"n_params": "x"}'):
            for _ in range(200):
                assert d.send(_json_frames(P.Cmd.HELLO, body)) == (ERROR, P.Status.BAD_PAYLOAD), body[:40]
    finally:
        logging.getLogger("gorila_zmq").removeHandler(handler)
    st = d.shard.stats()
    assert st["rejected"] == {"BAD_PAYLOAD": 1200}
    assert len(out.getvalue()) < 2000 and "Traceback" not in out.getvalue()
    assert d.send(P.message(P.Header(P.Cmd.HELLO, shard=0, layout=d.layout.hash), {"layout_hash": d.layout.hash,
                                                                                     "n_params": 5}))[0] == REPLY


def test_fields_checks_types_and_ranges():
    schema = {"batch": P.Field(int, 1, 4096), "min_size": P.Field(int, 0, 10, 0), "name": P.Field(str, hi=4, default="")}
    assert P.fields({"batch": 3}, schema, "X") == {"batch": 3, "min_size": 0, "name": ""}
    for bad in ({}, {"batch": True}, {"batch": 3.0}, {"batch": 0}, {"batch": 4097}, {"batch": 1, "min_size": 11},
                {"batch": 1, "name": "toolong"}, {"batch": 1, "name": 5}):
        with pytest.raises(P.ProtocolError) as e:
            P.fields(bad, schema, "X")
        assert e.value.status == P.Status.BAD_PAYLOAD


# -- the segment outlives the process -------------------------------------------------------------

def test_a_restarted_shard_re_adopts_its_segment_and_loses_nothing(driven):
    d = driven()
    grads = [grad(d.layout, k) for k in range(5)]
    for seq, g in enumerate(grads, 1):
        assert d.push(g, seq=seq) == (REPLY, P.Status.APPLIED)
    d.die()
    d2 = driven(layout=d.layout, theta0=d.theta0)
    assert d2.shard.counters["resumed_from"] == "segment" and d2.shard.state.version == 5
    np.testing.assert_allclose(d2.shard.state.theta, serial_adagrad(d2.cfg, d.theta0, grads), rtol=1e-6, atol=1e-7)
    assert d2.push(grads[2], seq=3, retry=True) == (REPLY, P.Status.APPLIED)     # the dedup table came along
    assert d2.shard.state.version == 5 and d2.shard.counters["duplicates"] == 1
    assert d2.push(grads[0], seq=6) == (REPLY, P.Status.APPLIED) and d2.shard.state.version == 6


def test_a_torn_apply_falls_back_to_the_checkpoint_and_says_so(driven, caplog):
    d = driven()
    for seq in (1, 2):
        d.push(grad(d.layout, seq), seq=seq)
    d.shard.checkpoint()                                                 # at version 2
    d.push(grad(d.layout, 3), seq=3)
    d.shard.state.begin()                                                # died inside an apply
    d.die()
    with caplog.at_level(logging.WARNING, "gorila_zmq.ps"):
        d2 = driven(layout=d.layout, theta0=d.theta0)
    assert d2.shard.counters["resumed_from"] == "checkpoint" and d2.shard.state.version == 2
    assert "torn" in caplog.text


def test_a_segment_of_another_run_in_the_same_directory_is_not_adopted(driven, make_cfg):
    d = driven()
    d.push(grad(d.layout, 1), seq=1)
    d.die()
    from gorila_zmq.launch.program import prepare_run
    prepare_run(d.cfg, from_env=False)                                   # a new run: a new token
    d2 = Driven(d.cfg, d.ctx)
    try:
        assert d2.shard.counters["resumed_from"] is None and d2.shard.state.version == 0
        assert d2.shard.state.refused and "another run" in d2.shard.state.refused
    finally:
        d2.stop()


def test_an_unreadable_checkpoint_stops_the_shard_unless_told_to_start_over(driven, make_cfg, ctx):
    from gorila_zmq.fields import ConfigError
    d = driven()
    d.push(grad(d.layout, 1), seq=1)
    d.shard.checkpoint()
    d.stop()                                                             # clean: the segment is gone
    path = d.shard.ckpt_path
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ConfigError, match="ps0.npz is unreadable"):
        Driven(d.cfg, ctx, d.layout, d.theta0)
    d.cfg.ps.bad_checkpoint = "initial"
    d3 = Driven(d.cfg, ctx, d.layout, d.theta0)
    try:
        assert d3.shard.state.version == 0
    finally:
        d3.stop()
