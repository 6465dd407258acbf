"""net.param_relay: one subscriber per host writes theta into shared memory, the host's roles read it
(ps/shared.py); the relay role on real shard sockets."""
import threading
import time

import numpy as np

from conftest import SMALL_MLP, wait_for
from gorila_zmq.ps.shared import SharedParams, SharedParamsWriter


def _names(tmp_path):
    return f"gzt_{abs(hash(str(tmp_path))) % 10**8}_params"


def test_reader_sees_each_slice_with_its_version(tmp_path):
    name = _names(tmp_path)
    ranges = [(0, 3), (3, 7)]
    w = SharedParamsWriter(name, 7, ranges)
    r = SharedParams(name, 7, 2, ranges)
    try:
        assert not r.wait_ready(0.1)                       # no slice yet: not ready
        w.write(0, np.arange(3, dtype=np.float32), 5, 11)
        assert not r.wait_ready(0.1)
        w.write(1, np.full(4, 9.0, np.float32), 8, 12)
        assert r.wait_ready(1.0)
        theta, versions, updates = r.latest()
        assert theta.tolist() == [0, 1, 2, 9, 9, 9, 9] and versions == [5, 8] and updates == 2
        w.set_alive([True, False])
        assert r.alive == [True, False] and r.global_version == 5
    finally:
        r.close()
        w.close()


def test_a_slice_being_written_is_never_read(tmp_path):
    """The per-slice sequence lock: while a slice's seq is odd the reader waits, then takes the new one."""
    name = _names(tmp_path)
    w = SharedParamsWriter(name, 4, [(0, 4)])
    r = SharedParams(name, 4, 1, [(0, 4)])
    try:
        w.write(0, np.zeros(4, np.float32), 1, 1)
        slot = w.v.slots[0]
        slot[0] += 1                                        # a write in progress ...
        w.v.theta[:2] = 7.0                                 # ... half done
        got = {}
        t = threading.Thread(target=lambda: got.update(zip(("theta", "versions", "u"), r.latest())))
        t.start()
        time.sleep(0.2)
        assert t.is_alive()                                 # the reader does not take the torn slice
        w.v.theta[2:] = 7.0
        slot[1] = 2
        slot[0] += 1                                        # the write completes
        t.join(5)
        assert got["theta"].tolist() == [7.0] * 4 and got["versions"] == [2]
    finally:
        r.close()
        w.close()


def test_reader_follows_a_restarted_relay(tmp_path):
    name = _names(tmp_path)
    w = SharedParamsWriter(name, 2, [(0, 2)])
    r = SharedParams(name, 2, 1, [(0, 2)])
    try:
        w.write(0, np.ones(2, np.float32), 3, 1)
        assert r.latest()[1] == [3]
        w.close()                                           # the relay dies; a new one takes the name
        w = SharedParamsWriter(name, 2, [(0, 2)])
        w.write(0, np.full(2, 4.0, np.float32), 9, 2)
        wait_for(lambda: r.latest()[1] == [9], 5, 0.2, "the reader to attach to the new segment")
        assert r.latest()[0].tolist() == [4.0, 4.0]
    finally:
        r.close()
        w.close()


def test_relay_role_hands_shard_theta_to_readers(make_cfg, ctx, tmp_path):
    """The relay role against a real shard: a push to the shard shows up in the reader's theta."""
    from gorila_zmq.launch.program import prepare_run
    from gorila_zmq.ps.client import GradientPusher, ShardSet
    from gorila_zmq.ps.layout import load_run_layout
    from gorila_zmq.ps.shared import param_source
    from gorila_zmq.roles.ps import ParameterServerShard
    from gorila_zmq.roles.relay import Relay
    cfg = make_cfg(*SMALL_MLP, "net.param_relay=true", "ps.shards=2", "ps.broadcast_every=1")
    prepare_run(cfg, from_env=False)
    shards = [ParameterServerShard(cfg, i, ctx) for i in range(2)]
    relay = Relay(cfg, 0, ctx)
    roles = shards + [relay]
    threads = [threading.Thread(target=x.run, daemon=True) for x in roles]
    for t in threads:
        t.start()
    try:
        layout = load_run_layout(cfg.run.run_dir)
        sset = ShardSet(cfg, layout)
        reader = param_source(ctx, sset, cfg, "learner0")
        assert isinstance(reader, SharedParams) and reader.wait_ready(20)
        theta0, v0, _ = reader.latest()
        assert v0 == [0, 0]
        p = GradientPusher(ctx, sset)
        p.push(np.full(layout.size, 0.1, np.float32), v0)
        assert p.flush(10) and p.stats.applied == 2
        wait_for(lambda: reader.latest()[1] == [1, 1], 10, 0.05, "the relay to pass the update on")
        theta1 = reader.latest()[0]
        assert np.allclose(theta1, shards[0].state.theta.tolist() + shards[1].state.theta.tolist())
        assert not np.allclose(theta1, theta0)
        st = relay.stats()
        assert st["role"] == "relay" and st["versions"] == [1, 1] and all(st["shards_alive"])
        p.close()
        reader.close()
    finally:
        for x in roles:
            x.request_stop()
        for t in threads:
            t.join(10)


def test_concurrent_writes_never_tear_a_slice(tmp_path):
    """A writer rewriting a large slice (each write one value, its version the same number) while a
    reader copies it: every slice the reader keeps is uniform and matches its version."""
    name = _names(tmp_path)
    n = 1 << 20
    w = SharedParamsWriter(name, n, [(0, n)])
    r = SharedParams(name, n, 1, [(0, n)])
    stop = threading.Event()

    def write():
        v = 0
        while not stop.is_set():
            v += 1
            w.write(0, np.full(n, float(v), np.float32), v, 1)
            time.sleep(0.001)             # a relay writes per broadcast, not back to back
    t = threading.Thread(target=write)
    try:
        w.write(0, np.zeros(n, np.float32), 0, 1)
        t.start()
        out = np.empty(n, np.float32)
        seen = set()
        end = time.monotonic() + 20
        while len(seen) <= 10 and time.monotonic() < end:      # until the writer has really moved on
            theta, versions, _ = r.latest(out)
            assert theta[0] == theta[-1] == theta[n // 2] == versions[0], (theta[0], theta[-1], versions)
            seen.add(versions[0])
        assert len(seen) > 10, seen
    finally:
        stop.set()
        t.join(5)
        r.close()
        w.close()
