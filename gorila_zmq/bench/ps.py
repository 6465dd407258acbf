"""Gradient push + apply + reply through real shard processes, against raw ZeroMQ of the same bytes.

For 1, 2 and 4 shards over tcp and ipc loopback: our GradientPusher pushing a Nature-DQN-sized
gradient (1,687,206 floats) to `gorila-zmq ps` processes (validation, staleness, finite check,
AdaGrad, reply), against raw DEALER->ROUTER requests of the same slices with a small reply, from the
same number of server processes, with the same in-flight window. Then broadcast delivery latency of
a 6.7 MB slice to 1 and 4 subscriber processes. Shard broadcasts are switched off while pushes are
timed (they are measured separately), and checkpoints are off.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

from gorila_zmq import config as C
from gorila_zmq.net import protocol as P
from gorila_zmq.net.topology import free_base_port
from gorila_zmq.bench import Report
from gorila_zmq.ps.client import GradientPusher, ShardSet
from gorila_zmq.ps.subscriber import ParamSubscriber
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.agents.base import build_network
from gorila_zmq.launch.program import prepare_run

DESCRIPTION = __doc__.splitlines()[0]


def add_arguments(p):
    p.add_argument("--pushes", type=int, default=150, help="timed pushes per configuration")
    p.add_argument("--shards", default="1,2,4", help="shard counts to measure")
    p.add_argument("--transports", default="tcp,ipc")
    p.add_argument("--window", type=int, default=2, help="requests in flight per shard (both sides)")
    p.add_argument("--rounds", type=int, default=3, help="ours and raw alternate this many times; best of each")
    p.add_argument("--broadcasts", type=int, default=100, help="broadcasts timed per subscriber count")
    p.add_argument("--curve", action="store_true", help="also measure with CurveZMQ on (cluster mode)")
    p.add_argument("--apply-threads", type=int, default=None, help="ps.apply_threads for the shards (default: config)")


# -- processes ----------------------------------------------------------------------------------

def _start_shards(cfg, tmp: str) -> list[subprocess.Popen]:
    conf = prepare_run(cfg, from_env=False)
    return [subprocess.Popen([sys.executable, "-m", "gorila_zmq.cli", "ps", "--index", str(i), "--config", conf,
                              "--log-level", "WARNING"], start_new_session=True)
            for i in range(cfg.ps.shards)]


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def _raw_server(endpoint: str) -> None:
    """ROUTER that answers every request with a small reply (the baseline's shard)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(endpoint)
    reply = b"x" * 56
    while True:
        frames = s.recv_multipart(copy=False)
        s.send_multipart([frames[0], reply])


def _wait_hello(ctx, shards: ShardSet, timeout=30.0) -> None:
    end = time.monotonic() + timeout
    for i in range(shards.n):
        while True:
            try:
                shards.hello(ctx, i, timeout_s=0.5)
                break
            except Exception:
                if time.monotonic() > end:
                    raise RuntimeError(f"shard {i} did not start")


# -- measurements -------------------------------------------------------------------------------

def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole box so far, in clock ticks (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)          # idle and iowait are not busy


class _Busy:
    """Cores the whole box kept busy during a `with` block (all processes: pusher, shards, servers)."""

    def __enter__(self):
        self.b0, self.t0 = _busy_jiffies()
        return self

    def __exit__(self, *exc):
        b1, t1 = _busy_jiffies()
        ncpu = os.cpu_count() or 1
        self.cores = ncpu * (b1 - self.b0) / max(1, t1 - self.t0)


def _kernel_ms(size: int, shards: int, reps: int = 15) -> tuple[float, float]:
    """What a push costs the shards' kernels, one thread, in this process: the finite check and the
    AdaGrad apply over `size` floats split in `shards` slices (each slice's own theta and G, as the
    shard processes hold them), in ms per push. Out of cache, as a shard meets them: a 64 MB write
    evicts the caches before each timed call; the median of `reps`."""
    from gorila_zmq.ps import optim
    rng = np.random.default_rng(1)
    bounds = np.linspace(0, size, shards + 1).astype(int)
    sl = [((rng.standard_normal(b - a) * 1e-3).astype(np.float32), np.zeros(b - a, np.float32),
           np.full(b - a, 0.1, np.float32)) for a, b in zip(bounds[:-1], bounds[1:])]
    junk = np.zeros(64 << 20, np.uint8)

    def cold(fn) -> float:
        ts = []
        for _ in range(reps):
            np.add(junk, 1, out=junk)
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))
    check = cold(lambda: [optim.all_finite(g) for g, _, _ in sl])
    apply = cold(lambda: [optim.adagrad_update(th, G, g, 1e-4, 1e-10, 1) for g, th, G in sl])
    return check * 1e3, apply * 1e3


def _ours(ctx, cfg, layout, grad, pushes) -> float:
    shards = ShardSet(cfg, layout)
    _wait_hello(ctx, shards)
    p = GradientPusher(ctx, shards)
    for _ in range(10):                                  # warm-up
        p.push(grad, p.versions)
    p.flush(30)
    t0 = time.perf_counter()
    for _ in range(pushes):
        p.push(grad, p.versions)
    p.flush(60)
    dt = time.perf_counter() - t0
    ok = p.stats.lost == 0 and p.stats.rejected == 0
    p.close()
    if not ok:
        raise RuntimeError(f"pushes failed during the benchmark: {p.stats.as_dict()}")
    return pushes / dt


def _raw(ctx, endpoints, ranges, grad, pushes, window) -> float:
    socks = []
    for ep in endpoints:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
        socks.append(s)
    hdr = P.Header(P.Cmd.PUSH_GRAD).pack()
    slices = [grad[a:b] for a, b in ranges]

    def go(n):
        inflight = [0] * len(socks)
        for _ in range(n):
            for i, s in enumerate(socks):
                while inflight[i] >= window:
                    s.recv_multipart(copy=False)
                    inflight[i] -= 1
                s.send_multipart([hdr, slices[i]], copy=False)
                inflight[i] += 1
        for i, s in enumerate(socks):
            while inflight[i]:
                s.recv_multipart(copy=False)
                inflight[i] -= 1
    go(10)
    t0 = time.perf_counter()
    go(pushes)
    dt = time.perf_counter() - t0
    for s in socks:
        s.close()
    return pushes / dt


def _subscriber_proc(cfg_dict: dict, count: int, out_path: str) -> None:
    cfg = C.from_dict(cfg_dict)
    layout = ParamLayout.from_module(build_network(cfg))
    ctx = zmq.Context()
    sub = ParamSubscriber(ctx, ShardSet(cfg, layout))
    sub.wait_ready(30)
    sub.record_latency = True
    end = time.monotonic() + 120
    while len(sub.latency_ns) < count and time.monotonic() < end:
        time.sleep(0.01)
    with open(out_path, "w") as f:
        json.dump(sub.latency_ns[:count], f)
    sub.close()
    ctx.destroy(linger=0)


def _broadcast_latency(ctx, cfg, layout, grad, n_subs: int, count: int, tmp: str) -> np.ndarray:
    shards = ShardSet(cfg, layout)
    _wait_hello(ctx, shards)
    mpc = mp.get_context("spawn")
    outs = [os.path.join(tmp, f"sub{n_subs}_{k}.json") for k in range(n_subs)]
    procs = [mpc.Process(target=_subscriber_proc, args=(C.to_dict(cfg), count, o)) for o in outs]
    for p in procs:
        p.start()
    time.sleep(3.0)                      # subscribers connected and snapshotted
    pusher = GradientPusher(ctx, shards)
    end = time.monotonic() + 150
    while any(p.is_alive() for p in procs) and time.monotonic() < end:
        pusher.push(grad, pusher.versions)  # each applied push triggers one broadcast
        pusher.flush(10)
        time.sleep(0.03)                 # paced: latency, not queueing behind the previous broadcast
    pusher.close()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
    lat = []
    for o in outs:
        if os.path.exists(o):
            lat += json.load(open(o))
    return np.array(lat, dtype=np.float64) / 1e6


def _curve(rep, ctx, layout, grad, tmp, args) -> None:
    """Gradient pushes with CurveZMQ on vs off, 1 shard over tcp, same window, same run."""
    from gorila_zmq.net import security
    keys = os.path.join(tmp, "keys")
    security.gen_keys(keys, ["bench"])
    rates = {}
    for k, on in enumerate((False, True, False, True)):
        extra = {"curve": True, "keys_dir": keys, "key_name": "bench"} if on else {}
        cfg = _base_cfg(tmp, "tcp", 1, free_base_port(16), broadcast_every=10**9, broadcast_interval_ms=1e9)
        C.apply_dict(cfg, {"net": dict(extra, in_flight=args.window)})
        print(f"  CurveZMQ {'on' if on else 'off'} ...", flush=True)
        procs = _start_shards(cfg, tmp)
        try:
            with security.use(security.load(keys, "bench") if on else None):
                r = _ours(ctx, cfg, layout, grad, args.pushes)
        finally:
            _stop(procs)
        rates.setdefault(on, []).append(r)
    off, on = max(rates[False]), max(rates[True])
    rep.row("push tcp 1 shard: CurveZMQ off", off, "pushes/s", "best of 2")
    rep.row("push tcp 1 shard: CurveZMQ on", on, "pushes/s", "best of 2")
    rep.metrics["curve_vs_plain_ratio"] = on / off
    rep.notes.append("CurveZMQ encrypts and authenticates every frame (Curve25519 key exchange, then "
                     "XSalsa20-Poly1305 per message) in ZeroMQ's I/O thread: a 6.7 MB gradient is "
                     "encrypted by the pusher's I/O thread and decrypted by the shard's, one core each")


def _base_cfg(tmp: str, transport: str, shards: int, port: int, **ps) -> C.Config:
    cfg = C.Config()
    C.apply_dict(cfg, {"run": {"run_dir": os.path.join(tmp, f"run-{transport}-{shards}-{port}")},
                       "net": {"transport": transport, "base_port": port, "request_timeout_s": 10.0},
                       "ps": {"shards": shards, "checkpoint_interval_s": 0.0, "max_staleness": 10**6, **ps},
                       "model": {"kind": "nature_cnn"}})
    return cfg.validate()


def run(args) -> Report:
    rep = Report()
    layout = ParamLayout.from_module(build_network(C.load(None, ["model.kind=nature_cnn"])))  # Nature DQN: 1,687,206 floats
    grad = (np.random.default_rng(0).standard_normal(layout.size) * 1e-3).astype(np.float32)
    ctx = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="gz-bench-ps-")
    ratios: dict[str, list[float]] = {}
    mpc = mp.get_context("spawn")
    for transport in args.transports.split(","):
        for S in [int(s) for s in args.shards.split(",")]:
            port = free_base_port(3 * S)     # shards use +0..+2S-1, the raw servers +2S..+3S-1: all checked free
            cfg = _base_cfg(tmp, transport, S, port, broadcast_every=10**9, broadcast_interval_ms=1e9)
            cfg.net.in_flight = args.window
            if args.apply_threads is not None:
                cfg.ps.apply_threads = args.apply_threads
            print(f"  {transport}, {S} shard(s): ours and raw ZeroMQ, {args.rounds} alternating rounds ...", flush=True)
            shards = ShardSet(cfg, layout)
            sock_dir = os.path.join(cfg.run.run_dir, "sock")
            os.makedirs(sock_dir, exist_ok=True)
            port_raw = ([f"tcp://127.0.0.1:{port + 2 * S + i}" for i in range(S)] if transport == "tcp"
                        else [f"ipc://{sock_dir}/raw{i}" for i in range(S)])
            procs = _start_shards(cfg, tmp)
            servers = [mpc.Process(target=_raw_server, args=(ep,), daemon=True) for ep in port_raw]
            for s in servers:
                s.start()
            time.sleep(1.0)
            ours_r, raw_r, busy = [], [], {"ours": [], "raw": []}
            try:
                for _ in range(args.rounds):    # alternate: a change of pace on the box hits both alike
                    with _Busy() as b:
                        ours_r.append(_ours(ctx, cfg, layout, grad, args.pushes))
                    busy["ours"].append(b.cores)
                    with _Busy() as b:
                        raw_r.append(_raw(ctx, port_raw, shards.ranges, grad, args.pushes, args.window))
                    busy["raw"].append(b.cores)
            finally:
                _stop(procs)
                for s in servers:
                    s.terminate()
                    s.join(5)
            ours, raw = max(ours_r), max(raw_r)
            rep.row(f"push {transport} {S} shard(s): gorila-zmq", ours, "pushes/s")
            rep.row(f"push {transport} {S} shard(s): raw ZeroMQ", raw, "req/s")
            rep.row(f"push {transport} {S} shard(s): ratio", ours / raw, "x")
            ratios.setdefault(transport, []).append(ours / raw)
            # Where the time goes: each push's extra time over raw ZeroMQ's, the part of it the shards'
            # kernels take (finite check, AdaGrad apply: measured alone, one thread), and the box's
            # busy cores in each phase (raw ZeroMQ near every core: the kernels cannot overlap it).
            b_ours, b_raw = float(np.median(busy["ours"])), float(np.median(busy["raw"]))
            check_ms, apply_ms = _kernel_ms(layout.size, S)
            gap_ms = 1e3 / ours - 1e3 / raw
            rep.row(f"push {transport} {S} shard(s): time per push over raw", gap_ms, "ms",
                    f"{1e3 / ours:.3f} ms vs {1e3 / raw:.3f} ms")
            rep.row(f"push {transport} {S} shard(s): finite check + AdaGrad apply per push", check_ms + apply_ms,
                    "ms", f"check {check_ms:.3f} ms, apply {apply_ms:.3f} ms; one thread, out of cache")
            rep.row(f"push {transport} {S} shard(s): busy cores, ours", b_ours, "cores",
                    f"raw ZeroMQ {b_raw:.2f}, of {os.cpu_count()}")
            rep.extra.setdefault("where_the_time_goes", []).append(
                {"transport": transport, "shards": S, "ms_per_push_ours": 1e3 / ours, "ms_per_push_raw": 1e3 / raw,
                 "check_ms": check_ms, "apply_ms": apply_ms, "busy_cores_ours": b_ours, "busy_cores_raw": b_raw})
    for transport, r in ratios.items():
        rep.metrics[f"push_vs_raw_ratio_{transport}"] = min(r)
    rep.notes.append("push_vs_raw_ratio_* is the lowest ratio over the shard counts measured")

    if args.curve:
        _curve(rep, ctx, layout, grad, tmp, args)
    p50s = []
    for n_subs in (1, 4):
        cfg = _base_cfg(tmp, "tcp", 1, free_base_port(16), broadcast_every=1, broadcast_interval_ms=1.0)
        print(f"  broadcast latency, {n_subs} subscriber(s) ...", flush=True)
        procs = _start_shards(cfg, tmp)
        try:
            lat = _broadcast_latency(ctx, cfg, layout, grad, n_subs, args.broadcasts, tmp)
        finally:
            _stop(procs)
        if lat.size == 0:
            rep.notes.append(f"no broadcast latencies recorded with {n_subs} subscribers")
            continue
        p50, p90 = np.percentile(lat, [50, 90])
        rep.row(f"broadcast 6.7 MB tcp -> {n_subs} subscriber(s) p50", p50, "ms", f"n={lat.size}")
        rep.row(f"broadcast 6.7 MB tcp -> {n_subs} subscriber(s) p90", p90, "ms")
        p50s.append(p50)
    if p50s:
        rep.metrics["broadcast_p50_ms"] = max(p50s)
        rep.notes.append("broadcast_p50_ms is the larger p50 of the 1- and 4-subscriber runs (tcp)")
    ctx.destroy(linger=0)
    return rep
