"""One load-generating process of `gorila-zmq bench scale`: many synthetic learners and actors as
threads, against real shards (python -m gorila_zmq.bench._scale_worker SPEC.json).

A synthetic learner does no learning: it reads theta from a real ParamSubscriber (as a learner does
before every update), waits `update_ms` (standing for the forward/backward pass: a sleep, so it costs
no CPU and 100 of them fit on 2 cores), then pushes a gradient of the real size through the real
GradientPusher. A synthetic actor subscribes and copies theta whenever it changed, at most every
`actor_sync_ms`. With `relay_segment`, they read theta from the shared memory of a relay role process
(net.param_relay: one subscriber per host) instead of a subscriber each.

The spec (JSON, written by bench/scale.py): config (a run's config.json path), learners, actors,
update_ms, grads_per_push, stall (learner indices that also sleep stall_s before each push: truly old
gradients), warmup_s, seconds, relay_segment (read theta from this host's relay) or null, io_threads,
curve_key (keys_dir, name) or null, out.
The worker writes `out + ".ready"` once every subscriber has theta, waits for `out + ".go"`, runs warmup
then the timed window, and writes its measurements to `out`.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time

import numpy as np
import zmq

from gorila_zmq import config as C
from gorila_zmq.net import security
from gorila_zmq.ps.client import GradientPusher, ShardSet
from gorila_zmq.ps.layout import load_run_layout
from gorila_zmq.ps.shared import SharedParams
from gorila_zmq.ps.subscriber import ParamSubscriber


class Window:
    """The timed window, shared by every thread of the process."""

    def __init__(self):
        self.start = self.end = float("inf")
        self.stop = threading.Event()
        self.go = threading.Event()               # learners push only once every thread is ready
        self.subs: list[ParamSubscriber] = []     # every subscriber of the process (latencies cleared at start)

    def inside(self, t: float) -> bool:
        return self.start <= t < self.end


def _theta_source(who: str, ctx, shards, reader, win: Window, out: dict):
    """The relay's shared memory (`reader`), or a subscriber of this thread's own; None (with
    out["error"]) when the shards gave no parameters in 60 s."""
    if reader is not None:
        return reader()
    sub = ParamSubscriber(ctx, shards, record_latency=True)
    win.subs.append(sub)
    if not sub.wait_ready(60):
        out["error"] = f"{who}: no parameters from every shard in 60 s"
        return None
    return sub


def _learner(k: int, spec: dict, ctx, shards, reader, win: Window, grad, out: dict) -> None:
    pusher = GradientPusher(ctx, shards, record_staleness=True)
    own = reader is None
    sub = _theta_source(f"learner {k}", ctx, shards, reader, win, out)
    if sub is None:
        return
    out["ready"] = True
    win.go.wait()
    theta = np.empty(shards.layout.size, np.float32)
    compute_s = spec["update_ms"] / 1000.0 * spec["grads_per_push"]
    stall_s = spec["stall_s"] if k in spec["stall"] else 0.0
    pushes = sent_bytes = 0
    blocked = 0.0
    while not win.stop.is_set():
        t0 = time.monotonic()
        if not pusher.wait_room(timeout_s=1.0):   # as the learner role does: the window first, then theta
            continue                       # (and see the stop flag at least every second)
        t1 = time.monotonic()
        _, versions, _ = sub.latest(theta)
        time.sleep(compute_s + stall_s)
        b0 = pusher.bytes_sent
        pusher.push(grad, versions)
        pusher.poll(0)
        if win.inside(t1):
            pushes += 1
            sent_bytes += pusher.bytes_sent - b0
            blocked += t1 - t0
        elif t1 < win.start:
            pusher.staleness_log.clear()
    pusher.flush(10)
    out.update(pushes=pushes, sent=pusher.stats.sent, bytes=sent_bytes, blocked_s=blocked, lost=pusher.stats.lost,
               rejected=pusher.stats.rejected, stale=pusher.stats.stale, stalled=bool(stall_s),
               staleness=[s for i, s, _ in pusher.staleness_log if i == 0])
    pusher.close()
    if own:
        out["latency_ns"] = sub.latency_ns[-2000:]
        sub.close()


def _actor(k: int, spec: dict, ctx, shards, reader, win: Window, out: dict) -> None:
    own = reader is None
    sub = _theta_source(f"actor {k}", ctx, shards, reader, win, out)
    if sub is None:
        return
    out["ready"] = True
    theta = np.empty(shards.layout.size, np.float32)
    seen, reads = -1, 0
    while not win.stop.is_set():
        if sub.updates != seen:
            _, _, seen = sub.latest(theta)
            reads += win.inside(time.monotonic())
        time.sleep(spec["actor_sync_ms"] / 1000.0)
    out["reads"] = reads
    if own:
        out["latency_ns"] = sub.latency_ns[-2000:]
        sub.close()


def main(argv: list[str]) -> int:
    spec = json.load(open(argv[0]))
    # Dozens of threads that each hold the GIL briefly: hand it over sooner than every 5 ms, or a
    # learner woken by its reply waits behind the others (a load-generator artefact, not the runtime's).
    sys.setswitchinterval(0.0005)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cfg = C.load(spec["config"], [])
    if cfg.net.grad_dtype != "float32":     # narrowing runs in torch: one thread, as a learner role runs it
        import torch                        # (agent.torch_threads); idle OpenMP workers spin and eat the box
        torch.set_num_threads(cfg.agent.torch_threads)
    layout = load_run_layout(cfg.run.run_dir)
    shards = ShardSet(cfg, layout)
    ctx = zmq.Context(io_threads=spec["io_threads"])
    ctx.set(zmq.MAX_SOCKETS, 65536)
    keys = security.load(*spec["curve_key"]) if spec.get("curve_key") else None
    with security.use(keys):
        return _run(spec, ctx, shards, layout)


def _run(spec, ctx, shards, layout) -> int:
    win = Window()
    seg = spec.get("relay_segment")      # this host's relay (a `gorila-zmq relay` process): theta in shared memory
    reader = (lambda: SharedParams(seg, layout.size, shards.n, shards.ranges)) if seg else None
    if reader is not None and not reader().wait_ready(60):
        raise SystemExit(f"the relay's {seg} had no parameters in 60 s")
    grad = (np.random.default_rng(os.getpid()).standard_normal(layout.size) * 1e-6).astype(np.float32)
    results = [{} for _ in range(spec["learners"] + spec["actors"])]
    threads = [threading.Thread(target=_learner, args=(k, spec, ctx, shards, reader, win, grad, results[k]),
                                daemon=True) for k in range(spec["learners"])]
    threads += [threading.Thread(target=_actor, args=(k, spec, ctx, shards, reader, win, results[spec["learners"] + k]),
                                 daemon=True) for k in range(spec["actors"])]
    # One at a time: a hundred subscribers snapshotting 31 shards at once time out and back off (a
    # thundering herd that says nothing about steady state).
    for t, r in zip(threads, results):
        t.start()
        end = time.monotonic() + 60
        while not (r.get("ready") or r.get("error")) and time.monotonic() < end:
            time.sleep(0.002)
        if not r.get("ready"):
            raise SystemExit(f"load generator not ready: {r.get('error', 'timed out')}")
    open(spec["out"] + ".ready", "w").close()
    while not os.path.exists(spec["out"] + ".go"):
        time.sleep(0.01)
    win.go.set()
    win.start = time.monotonic() + spec["warmup_s"]
    win.end = win.start + spec["seconds"]
    time.sleep(max(0.0, win.start - time.monotonic()))
    for sub in win.subs:
        sub.latency_ns.clear()
    cpu0 = time.process_time()
    c0 = [dict(sub.counters) for sub in win.subs]
    time.sleep(max(0.0, win.end - time.monotonic()))
    cpu1 = time.process_time()
    c1 = [dict(sub.counters) for sub in win.subs]
    received = {k: sum(b.get(k, 0) - a.get(k, 0) for a, b in zip(c0, c1)) for k in ("broadcasts", "snapshots", "gaps")}
    win.stop.set()
    for t in threads:
        t.join(30)
    learners = results[:spec["learners"]]
    lat = [x for r in results for x in r.get("latency_ns", [])]
    out = {"cpu_s": cpu1 - cpu0, "seconds": spec["seconds"], "pid": os.getpid(),
           "pushes": sum(r.get("pushes", 0) for r in learners if not r.get("stalled")),
           "stalled_pushes": sum(r.get("sent", 0) for r in learners if r.get("stalled")),   # whole run
           "stalled_stale": sum(r.get("stale", 0) for r in learners if r.get("stalled")),
           "bytes": sum(r.get("bytes", 0) for r in learners),
           "blocked_s": sum(r.get("blocked_s", 0.0) for r in learners),
           "lost": sum(r.get("lost", 0) for r in learners), "rejected": sum(r.get("rejected", 0) for r in learners),
           "staleness": [s for r in learners if not r.get("stalled") for s in r.get("staleness", [])],
           "received": received, "latency_ns": lat, "actor_reads": sum(r.get("reads", 0) for r in results[spec["learners"]:])}
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, spec["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
