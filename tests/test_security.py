"""CurveZMQ: keys, an encrypted shard that serves authorised clients only, and counted refusals."""
import os
import stat

import numpy as np
import pytest

from conftest import SMALL_MLP, start_role, stop_proc, wait_for
from gorila_zmq import config as C
from gorila_zmq.net import protocol as P
from gorila_zmq.net import security
from gorila_zmq.ps.client import GradientPusher, ShardSet, fetch_params
from gorila_zmq.ps.subscriber import ParamSubscriber
from gorila_zmq.net.rpc import Unavailable, request
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.agents.base import build_network
from gorila_zmq.launch.program import prepare_run


def test_keys_gen_layout_and_permissions(tmp_path):
    d = str(tmp_path / "keys")
    made = security.gen_keys(d, ["hostA", "hostB"])
    assert len(made) == 6
    for name in ("server", "hostA", "hostB"):
        sec = os.path.join(d, f"{name}.key_secret")
        assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    assert sorted(os.listdir(os.path.join(d, "authorized"))) == ["hostA.key", "hostB.key"]
    assert security.gen_keys(d, ["hostA"]) == []          # idempotent: existing keys are kept
    with pytest.raises(ValueError, match="missing key file"):
        security.load(d, "hostC")
    with pytest.raises(ValueError, match="does not exist"):
        security.load(str(tmp_path / "nope"), "hostA")
    with pytest.raises(C.ConfigError, match="net.keys_dir"):
        C.load(None, ["net.curve=true"])


@pytest.fixture
def curve_shard(make_cfg, tmp_path, ctx):
    keys = str(tmp_path / "keys")
    security.gen_keys(keys, ["hostA", "hostB"])
    stranger = str(tmp_path / "stranger")
    security.gen_keys(stranger, ["intruder"])        # its own server key too, and not authorised by us
    cfg = make_cfg(*SMALL_MLP, "net.curve=true", f"net.keys_dir={keys}", "net.key_name=hostA",
                   "ps.broadcast_every=1", "net.request_timeout_s=1.0")
    conf = prepare_run(cfg, from_env=False)
    proc = start_role(["ps", "--index", "0", "--config", conf], tmp_path / "ps0.log")
    layout = ParamLayout.from_module(build_network(cfg))
    shards = ShardSet(cfg, layout)
    authorised = security.load(keys, "hostB")
    with security.use(authorised):
        wait_for(lambda: _answers(ctx, shards), 30, what="the CurveZMQ shard to answer")
    yield cfg, shards, authorised, keys, stranger
    stop_proc(proc)


def _answers(ctx, shards):
    try:
        return shards.hello(ctx, 0, timeout_s=0.5)
    except Exception:
        return None


def _stats(ctx, shards, curve):
    with security.use(curve):
        return shards.stats(ctx, 0, timeout_s=2.0, retries=2)


def test_authorised_client_is_served(curve_shard, ctx):
    cfg, shards, authorised, keys, _ = curve_shard
    with security.use(authorised):
        p = GradientPusher(ctx, shards)
        sub = ParamSubscriber(ctx, shards)
        try:
            assert sub.wait_ready(10)
            p.push(np.full(shards.layout.size, 0.01, np.float32), p.versions)
            assert p.flush(10) and p.stats.applied == 1
            wait_for(lambda: sub.latest()[1] == [1], 10, what="the encrypted broadcast")
            assert np.array_equal(sub.latest()[0], fetch_params(ctx, shards)[0])
        finally:
            sub.close()
            p.close()
    st = _stats(ctx, shards, authorised)
    assert st["curve"] and st["updates_applied"] == 1


@pytest.mark.parametrize("who", ["stranger-key", "plain-text"])
def test_unauthorised_client_gets_nothing_and_is_counted(curve_shard, ctx, who):
    cfg, shards, authorised, keys, stranger_dir = curve_shard
    before = _stats(ctx, shards, authorised)["auth_failures"]
    if who == "stranger-key":
        # knows the real server public key (it is public) but holds a key the cluster never listed
        s = security.load(stranger_dir, "intruder")
        intruder = security.Curve(security.load(keys, "hostB").server_public, None, s.client_public,
                                  s.client_secret, s.authorized_dir)
    else:
        intruder = None                                   # no CurveZMQ at all
    with security.use(intruder):
        with pytest.raises(Unavailable):
            request(ctx, shards.req[0], P.Header(P.Cmd.GET_PARAMS, shard=0, layout=shards.layout.hash),
                    timeout_s=0.5, retries=1)
        with pytest.raises(Unavailable):
            request(ctx, shards.req[0], P.Header(P.Cmd.PUSH_GRAD, shard=0, layout=shards.layout.hash),
                    np.zeros(shards.layout.size, np.float32), timeout_s=0.5, retries=0)
        sub = ParamSubscriber(ctx, shards)
        try:
            assert not sub.wait_ready(2.0)                # no snapshot and no broadcast gets through
            assert sub.counters["broadcasts"] == 0
        finally:
            sub.close()
    after = _stats(ctx, shards, authorised)
    assert after["version"] == 0                          # nothing was applied
    assert after["auth_failures"] > before                # and the attempts show in the stats


def test_replay_shard_serves_only_authorised_keys(make_cfg, tmp_path, ctx):
    import threading
    from gorila_zmq.net import topology
    from gorila_zmq.agents.base import prepare
    from gorila_zmq.roles.replay import ReplayServer
    keys = str(tmp_path / "keys")
    security.gen_keys(keys, ["hostA", "hostB"])
    security.gen_keys(str(tmp_path / "stranger"), ["intruder"])
    cfg = make_cfg("env.name=CartPole-v1", "model.kind=mlp", "roles.mode=global", "agent.replay_capacity=1000",
                   "agent.learning_starts=10", "net.curve=true", f"net.keys_dir={keys}")
    prepare(cfg)
    with security.use(security.load(keys, "hostA")):
        server = ReplayServer(cfg, 0, ctx)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    ep = topology.replay(cfg, 0).connect
    try:
        with security.use(security.load(keys, "hostB")):
            rh, body = request(ctx, ep, P.Header(P.Cmd.STATS, shard=0), timeout_s=2.0, retries=2)
            assert P.as_json(rh, body)["auth_failures"] == 0
        s = security.load(str(tmp_path / "stranger"), "intruder")
        intruder = security.Curve(security.load(keys, "hostB").server_public, None, s.client_public,
                                  s.client_secret, s.authorized_dir)
        for who in (intruder, None):
            with security.use(who):
                with pytest.raises(Unavailable):
                    request(ctx, ep, P.Header(P.Cmd.REPLAY_SAMPLE, shard=0), {"batch": 4}, timeout_s=0.5, retries=1)
        with security.use(security.load(keys, "hostB")):
            rh, body = request(ctx, ep, P.Header(P.Cmd.STATS, shard=0), timeout_s=2.0, retries=2)
            assert P.as_json(rh, body)["auth_failures"] >= 2
    finally:
        server.request_stop()
        t.join(10)
