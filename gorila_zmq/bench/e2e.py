"""Dev mode on Pong for a fixed wall time: env frames/s, updates/s, gradient staleness and discards.

Starts `gorila-zmq dev --preset dev` (Pong, bundled mode) in a temporary run directory, lets it warm
up (replay filling, first updates), then measures over a window by asking every role for its stats
at the window's start and end. Staleness is the shard's (version - gradient version) histogram.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

from gorila_zmq import config as C
from gorila_zmq.net import topology
from gorila_zmq.bench import Report

DESCRIPTION = __doc__.splitlines()[0]


def add_arguments(p):
    p.add_argument("--seconds", type=float, default=120.0, help="measured window")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the window starts")
    p.add_argument("--env", default="Pong")
    p.add_argument("overrides", nargs="*", help="extra section.field=value for the run")


def _snapshot(cfg, program, ctx):
    from gorila_zmq.launch.status import collect
    st = collect(cfg, program, ctx, 2.0)
    frames = sum((v or {}).get("env_frames", 0) for k, v in st.items() if k.startswith("actor"))
    updates = sum((v or {}).get("updates_applied", 0) for k, v in st.items() if k == "ps0")
    learner = [v for k, v in st.items() if k.startswith("learner") and v]
    return time.monotonic(), frames, updates, st, learner


def _percentile(hist: dict, q: float) -> float:
    if not hist:
        return float("nan")
    keys = np.array(sorted(int(k) for k in hist))
    counts = np.array([hist[str(k)] for k in keys], dtype=float)
    cum = np.cumsum(counts) / counts.sum()
    return float(keys[np.searchsorted(cum, q)])


def run(args) -> Report:
    rep = Report()
    tmp = tempfile.mkdtemp(prefix="gz-bench-e2e-")
    run_dir = os.path.join(tmp, "run")
    port = topology.free_base_port()
    overrides = [f"run.run_dir={run_dir}", f"net.base_port={port}", f"env.name={args.env}",
                 "agent.learning_starts=2000", "agent.replay_capacity=60000", "eval.interval_s=100000",
                 "dev.progress_interval_s=10", *args.overrides]
    log = open(os.path.join(tmp, "dev.log"), "wb")
    dev = subprocess.Popen([sys.executable, "-m", "gorila_zmq.cli", "dev", "--preset", "dev", *overrides],
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ctx = zmq.Context()
    try:
        cfg_path = os.path.join(run_dir, "config.json")
        end = time.monotonic() + 120
        while not os.path.exists(cfg_path) and time.monotonic() < end:
            time.sleep(0.5)
        cfg = C.load(cfg_path)
        from gorila_zmq.launch.program import make_program
        program = make_program(cfg)
        print(f"  warming up {args.warmup:.0f}s (run dir {run_dir}) ...", flush=True)
        time.sleep(args.warmup)
        t0, f0, u0, _, _ = _snapshot(cfg, program, ctx)
        print(f"  measuring {args.seconds:.0f}s ...", flush=True)
        time.sleep(args.seconds)
        t1, f1, u1, st, learners = _snapshot(cfg, program, ctx)
    finally:
        dev.send_signal(signal.SIGTERM)
        try:
            dev.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
        ctx.destroy(linger=0)
    dt = t1 - t0
    ps0 = st.get("ps0") or {}
    hist = ps0.get("staleness", {})
    applied, stale = ps0.get("updates_applied", 0), ps0.get("discarded_stale", 0)
    dropped = sum(v.get("outliers_dropped", 0) for v in learners)
    computed = sum(v.get("updates", 0) for v in learners) + dropped
    rep.metrics["env_frames_per_s"] = (f1 - f0) / dt
    rep.metrics["updates_per_s"] = (u1 - u0) / dt
    rep.metrics["staleness_p50"] = _percentile(hist, 0.5)
    rep.metrics["staleness_p90"] = _percentile(hist, 0.9)
    rep.metrics["staleness_max_bucket"] = float(max((int(k) for k in hist), default=0))
    rep.metrics["stale_discard_fraction"] = stale / max(applied + stale, 1)
    rep.metrics["outlier_discard_fraction"] = dropped / max(computed, 1)
    rep.metrics["rejected_invalid"] = float(ps0.get("rejected_total", 0))
    rep.row("window", dt, "s")
    rep.row("env frames in window", f1 - f0, "frames")
    rep.row("applied updates in window", u1 - u0, "updates")
    rep.row("staleness histogram (shard 0, whole run)", 0, "", str(hist))
    rep.notes.append(f"dev preset, {args.env}, {cfg.ps.shards} shard(s), {cfg.roles.bundles} bundle(s), "
                     f"max_staleness {cfg.ps.max_staleness}; logs in {tmp}")
    return rep
