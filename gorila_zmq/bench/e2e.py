"""Dev mode on Pong for a fixed wall time: env frames/s, updates/s, gradient staleness and discards,
against the same DQN as one process.

Starts `gorila-zmq dev --preset dev` (Pong, bundled mode) in a temporary run directory, lets it warm
up (replay filling, first updates), then measures over a window by asking every role for its stats
at the window's start and end. Staleness is the shard's (version - gradient version) histogram.

The baseline (`single_process`): the same DQN in one process that alternates acting and learning, as
CleanRL's dqn_atari.py does: our AtariEnv, our replay memory, the same network, batch, n-step, Double
DQN, target period, epsilon schedule, outlier filter and replay ratio (one update per
agent.max_steps_per_update agent steps once learning_starts transitions are in), with the shard's
optimiser as torch.optim (Adam or Adagrad at the same settings) and torch on every core. Its warm-up
and window are the same; frames_vs_single_process_ratio and updates_vs_single_process_ratio divide
ours by it. `--no-baseline` skips it.
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
    p.add_argument("--no-baseline", action="store_true", help="skip the single-process baseline")
    p.add_argument("--baseline-threads", type=int, default=0,
                   help="torch threads of the single process (0: one per core, torch's default)")
    p.add_argument("overrides", nargs="*", help="extra section.field=value for the run")


def _snapshot(cfg, program, ctx):
    from gorila_zmq.launch.status import collect
    st = collect(cfg, program, ctx, 2.0)
    frames = sum((v or {}).get("env_frames", 0) for k, v in st.items() if k.startswith("actor"))
    updates = sum((v or {}).get("updates_applied", 0) for k, v in st.items() if k == "ps0")
    learner = [v for k, v in st.items() if k.startswith("learner") and v]
    return time.monotonic(), frames, updates, st, learner


def single_process(cfg, warmup: float, seconds: float, threads: int = 0) -> dict:
    """The same DQN as one process (see the module docstring): frames and updates per second over a
    window of `seconds` after `warmup` seconds."""
    import torch

    from gorila_zmq.agents import base as agents
    from gorila_zmq.agents.common import OutlierFilter
    from gorila_zmq.envs import env_spec, make_vec_env
    from gorila_zmq.replay.memory import ReplayMemory
    torch.set_num_threads(threads or os.cpu_count() or 1)
    agent = agents.prepare(cfg)
    spec = env_spec(cfg)
    online = agent.make_network(cfg)

    def load_theta(module):
        module.load_state_dict(online.state_dict())
    learning = agent.learning(cfg, online, load_theta, 0)
    if cfg.ps.optimizer == "adam":
        opt = torch.optim.Adam(online.parameters(), lr=cfg.ps.lr, betas=(cfg.ps.adam_beta1, cfg.ps.adam_beta2),
                               eps=cfg.ps.adam_eps)
    else:
        opt = torch.optim.Adagrad(online.parameters(), lr=cfg.ps.lr, eps=cfg.ps.eps,
                                  initial_accumulator_value=cfg.ps.initial_accumulator)
    policy = agent.behaviour(cfg, online, 0, 1)
    filt = OutlierFilter(cfg.agent.outlier_k, cfg.agent.outlier_warmup)
    vec = make_vec_env(cfg, seed=cfg.run.seed)
    rb = ReplayMemory(cfg.agent.replay_capacity, n_step=cfg.agent.n_step, gamma=cfg.agent.gamma, lanes=vec.n,
                      **agent.record(spec).memory_args())
    batch = rb.allocate_batch(cfg.agent.batch_size)
    rng = np.random.default_rng(cfg.run.seed)
    ratio = cfg.agent.max_steps_per_update or 4.0
    obs, frames = vec.reset(seed=cfg.run.seed)
    for e in range(vec.n):
        rb.start_episode(frames[e], lane=e)
    steps = updates = turns = env_frames = 0
    learn_from = None
    marks = {}
    t_start = time.monotonic()
    try:
        while True:
            now = time.monotonic() - t_start
            if "start" not in marks and now >= warmup:
                marks["start"] = (now, env_frames, updates)
            if now >= warmup + seconds:
                marks["end"] = (now, env_frames, updates)
                break
            with torch.no_grad():
                actions = policy.act(obs, agents.Clock(updates, env_frames))
            res = vec.step(actions)
            for e in range(vec.n):
                rb.add(actions[e], float(res.reward[e]), res.frames[e], bool(res.terminated[e]),
                       bool(res.truncated[e]), lane=e)
                if e in res.reset_frames:
                    rb.start_episode(res.reset_frames[e], lane=e)
            obs = res.obs
            steps += 1
            env_frames += vec.n * spec.frames_per_step
            if learn_from is None:
                if len(rb) < cfg.agent.learning_starts:
                    continue
                learn_from = steps
            while (steps - learn_from) * vec.n >= ratio * turns:        # the replay ratio, as ours holds it
                turns += 1
                rb.sample(cfg.agent.batch_size, rng, out=batch)
                t = batch.as_tensors()
                b = agents.Batch(*(torch.as_tensor(getattr(t, k)) for k in
                                   ("obs", "action", "reward", "discount", "next_obs")))
                _, ok = learning.gradients(b, updates, filt.accept)
                if ok:                            # a dropped batch (outlier) takes its turn, not an update
                    opt.step()
                    updates += 1
                    learning.after_update(updates)
    finally:
        vec.close()
        rb.close()
        rb.unlink()
    (t0, f0, u0), (t1, f1, u1) = marks["start"], marks["end"]
    return {"env_frames_per_s": (f1 - f0) / (t1 - t0), "updates_per_s": (u1 - u0) / (t1 - t0),
            "threads": torch.get_num_threads(), "turns": turns, "updates": updates, "steps": steps,
            "learn_from": learn_from}


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
    if not args.no_baseline:
        print(f"  single-process baseline: warming up {args.warmup:.0f}s, measuring {args.seconds:.0f}s ...",
              flush=True)
        base = single_process(cfg, args.warmup, args.seconds, args.baseline_threads)
        rep.row("single process: env frames/s", base["env_frames_per_s"], "frames/s",
                f"{base['threads']} torch threads")
        rep.row("single process: updates/s", base["updates_per_s"], "updates/s")
        rep.metrics["single_process_frames_per_s"] = base["env_frames_per_s"]
        rep.metrics["single_process_updates_per_s"] = base["updates_per_s"]
        rep.metrics["frames_vs_single_process_ratio"] = rep.metrics["env_frames_per_s"] / max(base["env_frames_per_s"], 1e-9)
        rep.metrics["updates_vs_single_process_ratio"] = rep.metrics["updates_per_s"] / max(base["updates_per_s"], 1e-9)
    return rep
