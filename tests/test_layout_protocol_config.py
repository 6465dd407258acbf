"""ParamLayout and shard ranges, the wire header, and configuration loading."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gorila_zmq import config as C
from gorila_zmq.net import protocol as P
from gorila_zmq.ps.layout import ParamLayout, shard_ranges
from gorila_zmq.agents.base import build_network


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5_000_000), s=st.integers(1, 64))
def test_shard_ranges_partition_exactly_once(n, s):
    if s > n:
        with pytest.raises(ValueError):
            shard_ranges(n, s)
        return
    r = shard_ranges(n, s)
    assert len(r) == s and r[0][0] == 0 and r[-1][1] == n
    for (a, b), (c, d) in zip(r, r[1:]):
        assert b == c                       # contiguous, no gap, no overlap
    sizes = [b - a for a, b in r]
    assert max(sizes) - min(sizes) <= 1     # near-equal
    assert sum(sizes) == n


def test_nature_dqn_layout_size_and_roundtrip():
    cfg = C.load(None, ["model.kind=nature_cnn"])
    m = build_network(cfg, seed=3)
    L = ParamLayout.from_module(m)
    assert L.size == 1_687_206
    flat = L.flatten(m)
    m2 = build_network(cfg, seed=4)
    assert not np.array_equal(L.flatten(m2), flat)
    L.load_into(m2, flat)
    assert np.array_equal(L.flatten(m2), flat)
    # same seed -> same init on every host
    assert np.array_equal(L.flatten(build_network(cfg, seed=3)), flat)


def test_layout_hash_depends_on_names_and_shapes():
    a = ParamLayout([("w", (3, 4), "float32"), ("b", (4,), "float32")])
    b = ParamLayout([("w", (4, 3), "float32"), ("b", (4,), "float32")])
    c = ParamLayout([("w2", (3, 4), "float32"), ("b", (4,), "float32")])
    assert len({a.hash, b.hash, c.hash}) == 3
    assert a.size == b.size == c.size == 16
    with pytest.raises(ValueError):
        ParamLayout([("w", (3,), "float64")])


def test_flatten_grads_fresh_array():
    m = torch.nn.Linear(3, 2)
    L = ParamLayout.from_module(m)
    m(torch.ones(1, 3)).sum().backward()
    g = L.flatten_grads(m)
    assert g.dtype == np.float32 and g.shape == (8,)
    np.testing.assert_allclose(g[:6], 1.0)


def test_header_roundtrip_and_rejections():
    h = P.Header(P.Cmd.PUSH_GRAD, shard=3, client=77, seq=2**40, pversion=12, layout=2**63 + 5)
    frames = P.message(h, np.arange(5, dtype=np.float32))
    hdr, payload = P.parse(frames)
    assert (hdr.command, hdr.shard, hdr.client, hdr.seq, hdr.pversion, hdr.layout) == \
           (P.Cmd.PUSH_GRAD, 3, 77, 2**40, 12, 2**63 + 5)
    np.testing.assert_array_equal(P.as_array(hdr, payload, P.Dtype.FLOAT32, 5), np.arange(5))
    good = frames[0]

    def status_of(frames):
        with pytest.raises(P.ProtocolError) as e:
            hdr, payload = P.parse(frames)
            P.as_array(hdr, payload, P.Dtype.FLOAT32, 5)
        return e.value.status

    assert status_of([b"\x00" * 7]) == P.Status.BAD_HEADER
    assert status_of([b"XX" + good[2:], frames[1]]) == P.Status.BAD_MAGIC
    assert status_of([good[:2] + bytes([99]) + good[3:], frames[1]]) == P.Status.BAD_VERSION
    assert status_of([good[:3] + bytes([250]) + good[4:], frames[1]]) == P.Status.BAD_COMMAND
    assert status_of([good, b"\x00" * 19]) == P.Status.BAD_SIZE          # length mismatch
    assert status_of([good, frames[1], b"x"]) == P.Status.BAD_FRAMES
    big = P.message(P.Header(P.Cmd.PUSH_GRAD), np.zeros(6, np.float32))
    assert status_of(big) == P.Status.OVERSIZED
    ints = P.message(P.Header(P.Cmd.PUSH_GRAD), np.zeros(5, np.int64))
    assert status_of(ints) == P.Status.BAD_DTYPE


def test_json_payload_is_json_not_pickle():
    frames = P.message(P.Header(P.Cmd.STATS), {"a": 1})
    hdr, payload = P.parse(frames)
    assert P.as_json(hdr, payload) == {"a": 1}
    bad = P.message(P.Header(P.Cmd.STATS, dtype=P.Dtype.JSON), b"\x80\x04\x95 pickle")
    bad[0] = P.Header(P.Cmd.STATS, dtype=P.Dtype.JSON, length=len(bad[1])).pack()
    hdr, payload = P.parse(bad)
    with pytest.raises(P.ProtocolError) as e:
        P.as_json(hdr, payload)
    assert e.value.status == P.Status.BAD_PAYLOAD


def test_config_toml_overrides_and_json(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[ps]\nshards = 3\nlr = 0.5\n[model]\nkind = "mlp"\nobs_shape = [4]\n')
    cfg = C.load(str(f), ["ps.lr=0.25", "net.transport=ipc", "model.hidden=32,32"])
    assert cfg.ps.shards == 3 and cfg.ps.lr == 0.25 and cfg.net.transport == "ipc"
    assert cfg.model.obs_shape == [4] and cfg.model.hidden == [32, 32]
    cfg2 = C.load(None, ["net.placement.ps0=10.1.0.1", "net.placement.actor0=10.1.0.2"])
    assert cfg2.net.placement == {"ps0": "10.1.0.1", "actor0": "10.1.0.2"}
    with pytest.raises(C.ConfigError, match="unknown roles"):
        C.load(None, ["net.placement.shard0=10.1.0.1"])
    out = tmp_path / "resolved.json"
    C.save_json(cfg, str(out))
    assert C.from_dict(json.loads(out.read_text())) == cfg


@pytest.mark.parametrize("bad, msg", [
    (["ps.nope=1"], "unknown key 'nope'"),
    (["nosection.x=1"], "unknown key 'nosection'"),
    (["ps.shards=abc"], "expected int"),
    (["ps.shards=0"], "ps.shards must be >= 1"),
    (["net.transport=udp"], "net.transport"),
    (["ps.lr"], "section.field=value"),
])
def test_config_errors_are_clear(bad, msg):
    with pytest.raises(C.ConfigError, match=msg):
        C.load(None, bad)


def test_config_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(str(tmp_path / "missing.toml"))
    f = tmp_path / "bad.toml"
    f.write_text("[ps\n")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(str(f))


def test_a_payload_whose_length_differs_from_the_header_is_refused():
    from gorila_zmq.net import protocol as P
    hdr = P.Header(P.Cmd.PUSH_GRAD, dtype=P.Dtype.FLOAT32, length=12)
    with pytest.raises(P.ProtocolError) as e:
        P.parse([hdr.pack(), b"\0" * 8])
    assert e.value.status == P.Status.BAD_SIZE


def test_a_resent_request_carries_the_retry_flag_and_the_first_send_does_not():
    import zmq
    from gorila_zmq.net import protocol as P
    from gorila_zmq.net.rpc import Window
    ctx = zmq.Context()
    try:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://retry")
        b.connect("inproc://retry")
        w = Window(2, timeout_s=0.0, retries=3)
        frames = P.message(P.Header(P.Cmd.PUSH_GRAD, seq=5), np.zeros(3, np.float32))
        b.send_multipart(frames)
        w.sent(5, frames)
        assert P.parse(a.recv_multipart())[0].flags == 0
        assert w.resend(b) == []
        resent, _ = P.parse(a.recv_multipart())
        assert resent.flags & P.FLAG_RETRY and resent.seq == 5
    finally:
        ctx.destroy(linger=0)          # closes both sockets, also when an assertion failed
