"""Synthetic learners and actors against real shard processes: throughput, staleness and bandwidth
over learners x shards x model size, and the cost model's error (gorila_zmq/launch/scale.py).

Shards are `gorila-zmq ps` processes, unchanged, on tcp (loopback, or with --netns across hosts made
of network namespaces whose links a token bucket shapes). The load runs in a few worker processes
(bench/_scale_worker.py), each holding many synthetic learners and actors as threads: a learner reads
theta through the real ParamSubscriber, sleeps its compute time, and pushes a real gradient through
the real GradientPusher; an actor copies theta whenever it changed.

Phases: (1) calibration, 1 shard and 1 learner with no compute, broadcasts off then on, which gives
the model's per-message and per-byte costs; (2) the sweep, each point predicted by the model from
those costs before it is measured; (3) the paper's layout, 100 learners x 31 shards, under the
`paper` preset's staleness policy and under a count bound, with one stalled learner; (4) bfloat16
gradients and grads_per_push against float32 and k = 1; (5) CurveZMQ on and off. Shard CPU time comes
from /proc (psutil), the staleness distribution from the pushers' replies, broadcast latency from the
subscribers (one host's clock).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import psutil
import zmq

from gorila_zmq import config as C
from gorila_zmq.bench import Report
from gorila_zmq.launch import scale as model
from gorila_zmq.net import protocol as P, topology
from gorila_zmq.net.rpc import Unavailable, request
from gorila_zmq.ps import shared as shared_params
from gorila_zmq.ps.client import ShardSet
from gorila_zmq.ps.layout import ParamLayout, load_run_layout, save_run_layout

DESCRIPTION = __doc__.splitlines()[0]

SIZES = {"small": 4_610, "nature": 1_687_206, "drqv2": 7_262_261}   # CartPole MLP 64x64, Nature DQN, DrQ-v2
STALL_AGES = 10.0        # the paper phase's stalled learner waits this many honest gradients' ages
QUICK = {"learners": "1,4,16,64,100", "shards": "1,4,31", "params": "nature", "update_ms": "20"}


def add_arguments(p):
    p.add_argument("--quick", action="store_true", help="a reduced sweep (Nature DQN, 3 shard counts, 5 learner "
                   "counts, 20 ms) that still reports every headline metric, in under 10 minutes")
    p.add_argument("--learners", default="1,2,4,8,16,32,64,100")
    p.add_argument("--shards", default="1,2,4,8,31")
    p.add_argument("--params", default="small,nature,drqv2", help="small, nature, drqv2 or a number of floats")
    p.add_argument("--update-ms", default="20,2.5", help="synthetic compute per update (a CPU and a GPU learner)")
    p.add_argument("--seconds", type=float, default=4.0, help="timed window per point")
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--procs", type=int, default=4, help="load-generating processes (each with a relay)")
    p.add_argument("--actors", type=int, default=0, help="synthetic actors (subscribers) beside the learners")
    p.add_argument("--no-relay", action="store_true", help="sweep with a subscriber per learner (as without "
                   "net.param_relay) instead of one relay per load process (a host's relay)")
    p.add_argument("--io-threads", type=int, default=1, help="ZeroMQ I/O threads per process (shards and workers)")
    p.add_argument("--netns", action="store_true", help="4 hosts in network namespaces: shards on 2, load on 2")
    p.add_argument("--link", default="1gbit", help="with --netns: every link's rate (tc tbf), e.g. 1gbit, 10gbit")
    p.add_argument("--delay-ms", type=float, default=0.2, help="with --netns: netem delay, where the kernel has it")
    p.add_argument("--skip", default="", help="phases to skip: sweep,fanout,paper,dtype,curve")
    p.add_argument("--plot", metavar="PATH", help="throughput and staleness against learners, a line per shard "
                   "count (matplotlib: pip install 'gorila-zmq[docs]')")
    p.add_argument("--points-json", metavar="PATH", help="write every measured point here")


def _ints(s):
    return [int(x) for x in str(s).split(",") if x]


def _sizes(s):
    return [(x, SIZES[x]) if x in SIZES else (x, int(float(x))) for x in str(s).split(",") if x]


class Bench:
    """One run: its temporary directory, ports, namespace hosts and worker launches."""

    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="gz-bench-scale-")
        self.port0 = 20000 + (os.getpid() % 20) * 100    # the ports stay below the ephemeral range (32768)
        self.ctx = zmq.Context()
        self.hosts = None
        self.cores = len(os.sched_getaffinity(0))
        self.k = 0

    # -- shards ---------------------------------------------------------------------------------
    def config(self, S: int, n: int, **over) -> tuple[C.Config, str]:
        self.k += 1
        self.port = self.port0 + (self.k * 100) % 10000
        cfg = C.Config()
        d = {"run": {"run_dir": os.path.join(self.tmp, f"run{self.k}")},
             "net": {"base_port": self.port, "request_timeout_s": 20.0, "io_threads": self.args.io_threads,
                     "heartbeat_interval_s": 2.0, "heartbeat_liveness": 10},
             "ps": {"shards": S, "checkpoint_interval_s": 0.0, "max_staleness": 0, "lr": 1e-4},
             "roles": {"mode": "global", "learners": self.args.procs, "actors": 1}}
        for sec, vals in over.items():
            d.setdefault(sec, {}).update(vals)
        # learner w stands for load process w's host: relay w serves it (topology.relay_hosts)
        if self.hosts is not None:
            shard_hosts = [h for h in self.hosts.names if h.startswith("ps")]
            load = [self.hosts.addr[h] for h in self.hosts.names if h.startswith("load")]
            d["net"]["placement"] = {f"ps{i}": self.hosts.addr[shard_hosts[i % len(shard_hosts)]] for i in range(S)}
            d["net"]["placement"].update({f"learner{w}": load[w % len(load)] for w in range(self.args.procs)})
            d["net"]["placement"]["actor0"] = load[0]
            d["net"]["host"] = self.hosts.addr[shard_hosts[0]]
        else:
            d["net"]["placement"] = {f"learner{w}": f"127.0.0.{w + 1}" for w in range(self.args.procs)}
        C.apply_dict(cfg, d)
        cfg.validate()
        os.makedirs(cfg.run.run_dir, exist_ok=True)
        layout = ParamLayout([("theta", (n,), "float32")])
        save_run_layout(cfg.run.run_dir, layout, S, np.zeros(n, np.float32) + 0.01)
        path = os.path.join(cfg.run.run_dir, "config.json")
        C.save_json(cfg, path)
        return cfg, path

    def start_shards(self, cfg, path) -> list[subprocess.Popen]:
        procs = []
        for i in range(cfg.ps.shards):
            pre = self.hosts.exec_prefix(self._shard_host(i)) if self.hosts else []
            log = open(os.path.join(cfg.run.run_dir, f"ps{i}.log"), "w")
            procs.append(subprocess.Popen(pre + [sys.executable, "-m", "gorila_zmq.cli", "ps", "--index", str(i),
                                                 "--config", path, "--log-level", "WARNING"],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        shards = ShardSet(cfg, load_run_layout(cfg.run.run_dir))
        end = time.monotonic() + 60
        for i in range(cfg.ps.shards):
            while True:
                try:
                    shards.hello(self.ctx, i, timeout_s=1.0)
                    break
                except Exception:
                    if time.monotonic() > end or procs[i].poll() is not None:
                        stop(procs)
                        tail = open(os.path.join(cfg.run.run_dir, f"ps{i}.log")).read()[-1500:]
                        raise RuntimeError(f"shard {i} did not start: {tail}")
        return procs

    def _shard_host(self, i: int) -> str:
        shard_hosts = [h for h in self.hosts.names if h.startswith("ps")]
        return shard_hosts[i % len(shard_hosts)]

    # -- one point ------------------------------------------------------------------------------
    def point(self, cfg, path, procs, N: int, update_ms: float, *, actors: int = 0, k: int = 1,
              stall: tuple = (), stall_s: float = 3.0, sub_per_process: bool = False, curve_key=None,
              workers: int | None = None) -> dict:
        args = self.args
        W = max(1, min(workers or args.procs, N + actors))
        shards = ShardSet(cfg, load_run_layout(cfg.run.run_dir))
        n = shards.layout.size
        specs, wprocs = [], []
        relays = self._start_relays(cfg, path, W) if sub_per_process else []
        for w in range(W):
            nl = N // W + (w < N % W)
            na = actors // W + (w < actors % W)
            first = sum(N // W + (v < N % W) for v in range(w))
            out = os.path.join(cfg.run.run_dir, f"w{time.monotonic_ns()}_{w}.json")
            spec = {"config": path, "learners": nl, "actors": na, "update_ms": update_ms, "grads_per_push": k,
                    "stall": [s - first for s in stall if first <= s < first + nl], "stall_s": stall_s,
                    "warmup_s": args.warmup, "seconds": args.seconds,
                    "relay_segment": shared_params.segment_name(cfg, self._relay_of(cfg, w)) if relays else None,
                    "io_threads": args.io_threads, "curve_key": curve_key, "actor_sync_ms": 5.0, "out": out}
            with open(out + ".spec", "w") as f:
                json.dump(spec, f)
            pre = self.hosts.exec_prefix(self._load_host(w)) if self.hosts else []
            log = open(out + ".log", "w")
            wprocs.append(subprocess.Popen(pre + [sys.executable, "-m", "gorila_zmq.bench._scale_worker", out + ".spec"],
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            specs.append(spec)
        try:
            end = time.monotonic() + 180
            while not all(os.path.exists(s["out"] + ".ready") for s in specs):
                for s, p in zip(specs, wprocs):
                    if p.poll() is not None:
                        raise RuntimeError(f"load worker exited {p.returncode}: {open(s['out'] + '.log').read()[-2000:]}")
                if time.monotonic() > end:
                    raise RuntimeError("load workers not ready in 180 s")
                time.sleep(0.05)
            for s in specs:
                open(s["out"] + ".go", "w").close()
            time.sleep(args.warmup)
            before = self._sample(shards, procs)
            r0 = [self._relay_stats(cfg, self._relay_of(cfg, w)) for w in range(len(relays))]
            time.sleep(args.seconds)
            after = self._sample(shards, procs)
            r1 = [self._relay_stats(cfg, self._relay_of(cfg, w)) for w in range(len(relays))]
            for s, p in zip(specs, wprocs):
                p.wait(120)
                if p.returncode != 0:
                    raise RuntimeError(f"load worker exited {p.returncode}: {open(s['out'] + '.log').read()[-2000:]}")
        finally:
            stop(wprocs)
            stop(relays)
        outs = [json.load(open(s["out"])) for s in specs]
        for o, a, b in zip(outs, r0, r1):      # a relay's subscriber receives for its host's roles
            for key in ("broadcasts", "snapshots"):
                o["received"][key] += b.get(key, 0) - a.get(key, 0)
        res = self._metrics(cfg, N, actors, update_ms, k, W, sub_per_process, before, after, outs, n)
        lat = [(b.get("broadcast_latency_p50_ms"), b.get("broadcast_latency_p99_ms")) for b in r1]
        lat = [x for x in lat if x[0] is not None]
        if lat:                                  # the worst relay's (its latest 1,000 broadcasts)
            res["broadcast_latency_p50_ms"] = max(x[0] for x in lat)
            res["broadcast_latency_p99_ms"] = max(x[1] for x in lat)
        return res

    def _relay_of(self, cfg, w: int) -> int:
        return topology.relay_index(cfg, f"learner{w}")

    def _start_relays(self, cfg, path, W: int) -> list[subprocess.Popen]:
        """One relay role process per load process (its host), as net.param_relay runs them."""
        procs = []
        for w in range(W):
            k = self._relay_of(cfg, w)
            pre = self.hosts.exec_prefix(self._load_host(w)) if self.hosts else []
            log = open(os.path.join(cfg.run.run_dir, f"relay{k}.log"), "a")
            procs.append(subprocess.Popen(pre + [sys.executable, "-m", "gorila_zmq.cli", "relay", "--index", str(k),
                                                 "--config", path, "--log-level", "WARNING"],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        end = time.monotonic() + 60
        for w, p in enumerate(procs):
            while not self._relay_stats(cfg, self._relay_of(cfg, w)):
                if p.poll() is not None or time.monotonic() > end:
                    stop(procs)
                    raise RuntimeError(f"relay for load process {w} did not start (see {cfg.run.run_dir}/relay*.log)")
                time.sleep(0.1)
        return procs

    def _load_host(self, w: int) -> str:
        load = [h for h in self.hosts.names if h.startswith("load")]
        return load[w % len(load)]

    def _relay_stats(self, cfg, k: int) -> dict:
        host = topology.relay_hosts(cfg)[k]
        try:
            rhdr, body = request(self.ctx, topology.control(cfg, "relay", k, host=host).connect,
                                 P.Header(P.Cmd.STATS), timeout_s=2.0, retries=0)
            return P.as_json(rhdr, body, max_bytes=1 << 20)
        except (Unavailable, P.ProtocolError):
            return {}

    def _sample(self, shards, procs) -> dict:
        t = time.monotonic()
        cpu = [sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs]
        stats = [shards.stats(self.ctx, i, timeout_s=20.0, retries=1) for i in range(shards.n)]
        return {"t": t, "cpu": cpu, "stats": stats}

    def _metrics(self, cfg, N, actors, update_ms, k, W, sub_pp, b, a, outs, n) -> dict:
        S = cfg.ps.shards
        dt = a["t"] - b["t"]
        d = lambda key, i: a["stats"][i][key] - b["stats"][i][key]       # noqa: E731
        applied = [d("updates_applied", i) for i in range(S)]
        stale = [d("discarded_stale", i) for i in range(S)]
        bcasts = [d("broadcasts", i) for i in range(S)]
        cpu = [a["cpu"][i] - b["cpu"][i] for i in range(S)]
        subscribers = (1 if sub_pp else 0) * W + (0 if sub_pp else N + actors)
        slice_bytes = 4 * n / S
        st = np.array([x for o in outs for x in o["staleness"]], dtype=np.float64)
        lat = np.array([x for o in outs for x in o["latency_ns"]], dtype=np.float64) / 1e6
        client_cpu = sum(o["cpu_s"] for o in outs) / outs[0]["seconds"]
        pushes = sum(o["pushes"] for o in outs)
        blocked = sum(o["blocked_s"] for o in outs) / max(1, N * outs[0]["seconds"])
        res = {
            "learners": N, "shards": S, "params": n, "update_ms": update_ms, "grads_per_push": k,
            "actors": actors, "grad_dtype": cfg.net.grad_dtype, "curve": cfg.net.curve, "sub_per_process": sub_pp,
            "io_threads": cfg.net.io_threads,
            "processes": S + W, "sockets": 2 * S + (N * 2 * S if not sub_pp else N * S + W * S) + actors * S,
            "updates_per_s": applied[0] / dt,
            "pushes_per_s_per_shard": float(np.mean([x + y for x, y in zip(applied, stale)])) / dt,
            "shard_bytes_in_per_s": float(np.mean([d("bytes_in", i) for i in range(S)])) / dt,
            "shard_bytes_out_per_s": sum(o["received"]["broadcasts"] + o["received"]["snapshots"] for o in outs)
            * slice_bytes / S / outs[0]["seconds"],
            "broadcasts_delivered_fraction": sum(o["received"]["broadcasts"] for o in outs) / outs[0]["seconds"]
            / max(1e-9, float(np.sum(bcasts)) / dt * subscribers / S) / S if sum(bcasts) else 1.0,
            "broadcasts_per_s_per_shard": float(np.mean(bcasts)) / dt,
            "shard_cpu_ms_per_update": 1000.0 * float(np.mean([c / max(x + y, 1) for c, x, y in zip(cpu, applied, stale)])),
            "shard_cpu_util_max": max(cpu) / dt, "shard_cpu_util_sum": sum(cpu) / dt, "client_cpu_util": client_cpu,
            "client_cpu_util_max": max(o["cpu_s"] for o in outs) / outs[0]["seconds"],
            "box_cpu_util": (sum(cpu) / dt + client_cpu) / self.cores,
            "learner_blocked_fraction": blocked,
            "bytes_per_push": sum(o["bytes"] for o in outs) / max(1, pushes + sum(o["stalled_pushes"] for o in outs)),
            "discard_fraction": sum(stale) / max(1, sum(applied) + sum(stale)),
            "lost": sum(o["lost"] for o in outs), "rejected": sum(o["rejected"] for o in outs),
            "stalled_pushes": sum(o["stalled_pushes"] for o in outs),
            "stalled_discarded": sum(o["stalled_stale"] for o in outs),
            "subscribers": subscribers,
        }
        if st.size:
            res.update({f"staleness_p{q}": float(np.percentile(st, q)) for q in (50, 90, 99)})
            res["staleness_max"] = float(st.max())
        if lat.size:
            res["broadcast_latency_p50_ms"] = float(np.percentile(lat, 50))
            res["broadcast_latency_p99_ms"] = float(np.percentile(lat, 99))
        res["bottleneck"] = _bottleneck(res, self.cores, self.link_bytes())
        return res

    def link_bytes(self) -> float | None:
        return model._link(self.args.link) / 8.0 if self.hosts else None

    def layout_for(self, cfg, N, update_ms, actors=0, k=1, sub_pp=False, W=None) -> model.Layout:
        W = max(1, min(W or self.args.procs, N + actors))
        return model.Layout(
            learners=N, shards=cfg.ps.shards, params=load_run_layout(cfg.run.run_dir).size,
            update_ms=update_ms, subscribers=W if sub_pp else N + actors, grad_bytes=4 if cfg.net.grad_dtype == "float32" else 2,
            grads_per_push=k, window=cfg.net.in_flight, broadcast_every=cfg.ps.broadcast_every,
            broadcast_interval_ms=cfg.ps.broadcast_interval_ms, broadcast_min_interval_ms=cfg.ps.broadcast_min_interval_ms,
            max_staleness=cfg.ps.max_staleness, max_staleness_s=cfg.ps.max_staleness_s,
            staleness_factor=cfg.ps.staleness_factor, cores=self.cores,
            client_procs=W, link_bps=model._link(self.args.link) if self.hosts else None, cluster=False,
            shard_hosts=2 if self.hosts else 0, load_hosts=2 if self.hosts else 0)


def _bottleneck(r: dict, cores: int, link: float | None) -> str:
    if r["shard_cpu_util_max"] > 0.85:
        return "shard CPU"
    if r["box_cpu_util"] > 0.85:
        return f"box CPU ({cores} cores for shards and clients)"
    if r["client_cpu_util_max"] > 0.85:
        return "client CPU (one load process)"
    if link and max(r["shard_bytes_in_per_s"], r["shard_bytes_out_per_s"]) > 0.8 * link:
        return "link"
    if r["learner_blocked_fraction"] > 0.3:
        return "in-flight window"
    return "learner compute (update_ms)"


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


# -- phases -------------------------------------------------------------------------------------

def calibrate(b: Bench, rep: Report) -> model.Costs:
    """No compute, broadcasts off: per-message and per-element costs of a shard and a client (1 shard,
    1 learner, a small and a Nature-sized gradient), how a message's cost grows with the shard
    processes on the box (31 shards, 1 learner) and with the learners per shard (4 shards, 100
    learners); then the fan-out's per-byte costs (a broadcast after every update, 8 subscribers)."""
    off = {"ps": {"broadcast_every": 10**9, "broadcast_interval_ms": 1e9}}
    got = {}
    for name, S, N, n in (("small", 1, 1, 4_096), ("large", 1, 1, SIZES["nature"]), ("shards", 31, 1, 4_096 * 31),
                          ("learners", 4, 100, SIZES["nature"])):
        cfg, path = b.config(S, n, **off)
        procs = b.start_shards(cfg, path)
        try:   # 100 learners at 20 ms saturate the box: what a message costs among that many peers
            r = b.point(cfg, path, procs, N, 20.0 if N > 1 else 0.0, sub_per_process=True)
        finally:
            stop(procs)
        x = r["pushes_per_s_per_shard"]
        got[name] = (n, S, N, r["shard_cpu_ms_per_update"] / 1e3, r["client_cpu_util"] / x)
        print(f"  calibration {name} ({S} shard(s), {N} learner(s), {n:,} floats): {x:,.0f} pushes/s, shard "
              f"{r['shard_cpu_ms_per_update']:.3f} ms CPU per message, client {1e3 * got[name][4]:.3f} ms per push",
              flush=True)
    n1, _, _, sh1, cl1 = got["small"]
    n2, _, _, sh2, cl2 = got["large"]
    c = model.Costs(shard_elem_s=max(0.0, (sh2 - sh1) / (n2 - n1)), client_elem_s=max(0.0, (cl2 - cl1) / (n2 - n1)))
    c.shard_msg_s = max(1e-6, sh1 - c.shard_elem_s * n1)
    c.client_msg_s = max(1e-6, cl1 - c.client_elem_s * n1)
    n3, S3, _, sh3, cl3 = got["shards"]
    c.shard_msg_per_shard_s = max(0.0, (sh3 - c.shard_elem_s * n3 / S3 - c.shard_msg_s) / (S3 - 1))
    c.client_msg_per_shard_s = max(0.0, ((cl3 - c.client_elem_s * n3) / S3 - c.client_msg_s) / (S3 - 1))
    n4, S4, N4, sh4, cl4 = got["learners"]
    c.shard_msg_per_learner_s = max(0.0, (sh4 - c.shard_elem_s * n4 / S4 - c.shard_msg_s
                                          - c.shard_msg_per_shard_s * (S4 - 1)) / (N4 - 1))
    c.client_msg_per_learner_s = max(0.0, ((cl4 - c.client_elem_s * n4) / S4 - c.client_msg_s
                                           - c.client_msg_per_shard_s * (S4 - 1)) / (N4 - 1))
    c.note = f"bench scale calibration on this box ({b.cores} cores)"
    # the fan-out: broadcast every update to 1 learner + 7 actors
    cfg, path = b.config(1, SIZES["nature"], ps={"broadcast_every": 1, "broadcast_interval_ms": 1e9})
    procs = b.start_shards(cfg, path)
    try:
        r = b.point(cfg, path, procs, 1, 20.0, actors=7, workers=1)
    finally:
        stop(procs)
    x, n = r["pushes_per_s_per_shard"], SIZES["nature"]
    delivered = r["shard_bytes_out_per_s"]
    shard_extra = r["shard_cpu_util_sum"] - x * (c.shard_msg_s + c.shard_elem_s * n)
    client_extra = r["client_cpu_util"] - x * (c.client_msg_s + c.client_elem_s * n)
    c.pub_byte_s = max(1e-12, shard_extra / max(delivered, 1.0))
    c.sub_byte_s = max(1e-12, client_extra / max(delivered, 1.0))
    print(f"  calibration fan-out: {delivered / 1e6:,.0f} MB/s to {r['subscribers']} subscribers; publish "
          f"{c.pub_byte_s * 1e9:.3f} ns/B, receive {c.sub_byte_s * 1e9:.3f} ns/B", flush=True)
    for k, v in model.asdict(c).items():
        if isinstance(v, float):
            rep.metrics[f"cost_{k}"] = v
    return c


def sweep(b: Bench, rep: Report, costs: model.Costs, points: list) -> None:
    a = b.args
    learners, shard_counts = _ints(a.learners), _ints(a.shards)
    updates = [float(x) for x in str(a.update_ms).split(",") if x]
    for pname, n in _sizes(a.params):
        for S in shard_counts:
            if S > n:
                continue
            cfg, path = b.config(S, n)
            procs = b.start_shards(cfg, path)
            try:
                for ms in updates:
                    for N in learners:
                        relay = not a.no_relay
                        pred = model.predict(b.layout_for(cfg, N, ms, a.actors, sub_pp=relay), costs)
                        r = b.point(cfg, path, procs, N, ms, actors=a.actors, sub_per_process=relay)
                        r.update(model=pname, predicted_updates_per_s=pred.updates_per_s,
                                 predicted_staleness_p50=pred.staleness_p50, predicted_bottleneck=pred.bottleneck,
                                 error_updates=_err(pred.updates_per_s, r["updates_per_s"]),
                                 error_staleness=_err(pred.staleness_p50, r.get("staleness_p50", 0.0)))
                        points.append(r)
                        _print_point(r)
            finally:
                stop(procs)
    if points:
        worst = max(points, key=lambda r: r["error_updates"])
        rep.metrics["model_worst_error"] = worst["error_updates"]
        rep.metrics["model_median_error"] = float(np.median([r["error_updates"] for r in points]))
        ws = max(points, key=lambda r: r["error_staleness"])
        rep.metrics["model_worst_staleness_error"] = ws["error_staleness"]
        rep.notes.append(f"model's worst updates/s error {worst['error_updates']:.1%} at {_name(worst)}; worst "
                         f"median-staleness error {ws['error_staleness']:.1%} at {_name(ws)}")


def _err(pred: float, meas: float) -> float:
    # staleness of ~0 on either side: count an error of under one update as none
    if abs(pred - meas) < 1.0 and max(pred, meas) < 4.0:
        return 0.0
    return abs(pred - meas) / max(abs(meas), 1e-9)


def _name(r: dict) -> str:
    return (f"N={r['learners']} S={r['shards']} {r.get('model', r['params'])} {r['update_ms']:g} ms"
            + (f" {r['grad_dtype']}" if r["grad_dtype"] != "float32" else "") + (f" k={r['grads_per_push']}" if r["grads_per_push"] > 1 else ""))


def _print_point(r: dict) -> None:
    pred = ""
    if "predicted_updates_per_s" in r:
        pred = f" (model {r['predicted_updates_per_s']:,.0f}, {_err(r['predicted_updates_per_s'], r['updates_per_s']):.0%} off)"
    print(f"  {_name(r):<34} {r['updates_per_s']:9,.1f} updates/s{pred}; staleness p50 {r.get('staleness_p50', 0):.0f} "
          f"p99 {r.get('staleness_p99', 0):.0f}; discarded {r['discard_fraction']:.1%}; shard out "
          f"{r['shard_bytes_out_per_s'] / 1e6:,.0f} MB/s; {r['bottleneck']}", flush=True)


def paper(b: Bench, rep: Report, costs: model.Costs, points: list) -> None:
    """100 synthetic learners x 31 shards, Nature DQN, 20 ms per update, relays as the preset runs them,
    and a 101st learner that stalls before every push: first under a count bound of 50 (the old
    default), then under the `paper` preset's staleness policy with the stall several times an honest
    gradient's age in this layout (what "truly old" means here), over a window long enough to see it."""
    pp = C.PRESETS["paper"]["ps"]
    policy = {k: pp[k] for k in ("max_staleness", "max_staleness_s", "staleness_factor") if k in pp}
    relay = C.PRESETS["paper"]["net"]["param_relay"]
    cfg, path = b.config(31, SIZES["nature"], ps={"max_staleness": 50, "max_staleness_s": 0.0})
    procs = b.start_shards(cfg, path)
    try:
        r50 = b.point(cfg, path, procs, 101, 20.0, stall=(100,), stall_s=3.0, sub_per_process=relay)
    finally:
        stop(procs)
    r50.update(model="nature", policy="max_staleness=50")
    points.append(r50)
    _print_point(r50)
    honest_age = r50.get("staleness_p50", 0.0) / max(r50["updates_per_s"], 1e-9)
    stall = max(3.0, STALL_AGES * honest_age)
    cfg, path = b.config(31, SIZES["nature"], ps=policy)
    procs = b.start_shards(cfg, path)
    seconds = b.args.seconds
    b.args.seconds = max(seconds, stall + 6.0)
    try:
        r = b.point(cfg, path, procs, 101, 20.0, stall=(100,), stall_s=stall, sub_per_process=relay)
    finally:
        b.args.seconds = seconds
        stop(procs)
    pred = model.predict(replace(b.layout_for(cfg, 100, 20.0, sub_pp=relay)), costs)
    r.update(model="nature", policy="paper", stall_s=stall, predicted_updates_per_s=pred.updates_per_s,
             predicted_discard_fraction=pred.discard_fraction)
    points.append(r)
    _print_point(r)
    honest = r["discard_fraction"]
    rep.metrics["paper_n100_stale_discard_fraction"] = honest
    rep.metrics["paper_n100_updates_per_s"] = r["updates_per_s"]
    rep.metrics["paper_n100_stalled_learner_discarded"] = r["stalled_discarded"] / max(1, 31 * r["stalled_pushes"])
    rep.metrics["count50_n100_stale_discard_fraction"] = r50["discard_fraction"]
    rep.row("paper layout (100 x 31, Nature DQN, 20 ms, relays): applied updates/s", r["updates_per_s"], "updates/s",
            f"policy {policy}")
    rep.row("  discarded as stale (every push, the stalled learner's included)", honest, "fraction")
    rep.row(f"  the stalled learner's pushes discarded (stall {stall:.1f} s = {STALL_AGES:g} x an honest age)",
            rep.metrics["paper_n100_stalled_learner_discarded"], "fraction", f"{r['stalled_pushes']} pushes")
    rep.row("same layout, ps.max_staleness=50 (the old default): discarded", r50["discard_fraction"], "fraction")
    rep.row("  applied updates/s", r50["updates_per_s"], "updates/s")


def fanout(b: Bench, rep: Report, costs: model.Costs, points: list, S: int = 4) -> None:
    """The broadcast fan-out: a subscriber per learner (every role subscribing, as without
    net.param_relay) against one relay per load process, at 16 and 64 learners."""
    cfg, path = b.config(S, SIZES["nature"])
    procs = b.start_shards(cfg, path)
    try:
        for N in (16, 64):
            got = {}
            for relay in (False, True):
                pred = model.predict(b.layout_for(cfg, N, 20.0, sub_pp=relay), costs)
                r = b.point(cfg, path, procs, N, 20.0, sub_per_process=relay)
                r.update(model="nature", variant="relay" if relay else "per-learner subscribers",
                         predicted_updates_per_s=pred.updates_per_s, predicted_staleness_p50=pred.staleness_p50,
                         error_updates=_err(pred.updates_per_s, r["updates_per_s"]),
                         error_staleness=_err(pred.staleness_p50, r.get("staleness_p50", 0.0)))
                points.append(r)
                _print_point(r)
                got[relay] = r
                rep.row(f"fan-out, {N} learners x {S} shards, {'relay per process' if relay else 'subscriber per learner'}",
                        r["updates_per_s"], "updates/s", f"staleness p50 {r.get('staleness_p50', 0):.0f}, shard out "
                        f"{r['shard_bytes_out_per_s'] / 1e6:,.0f} MB/s, {r['subscribers']} subscribers")
            rep.metrics[f"relay_vs_subscribers_updates_ratio_n{N}"] = got[True]["updates_per_s"] / max(got[False]["updates_per_s"], 1e-9)
    finally:
        stop(procs)


def dtypes(b: Bench, rep: Report, points: list, S: int = 4, N: int = 16) -> None:
    """Gradient bytes per applied update and updates/s: float32, bfloat16, and k = 4 minibatches per push."""
    res = {}
    for label, net, k in (("float32", "float32", 1), ("bfloat16", "bfloat16", 1), ("float16", "float16", 1),
                          ("k4", "float32", 4)):
        cfg, path = b.config(S, SIZES["nature"], net={"grad_dtype": net})
        procs = b.start_shards(cfg, path)
        try:
            r = b.point(cfg, path, procs, N, 20.0 / k if label == "k4" else 20.0, k=k, sub_per_process=True)
        finally:
            stop(procs)
        r.update(model="nature", variant=label)
        points.append(r)
        _print_point(r)
        applied = r["updates_per_s"]
        grads = applied * k                       # minibatch gradients per second carried by those updates
        res[label] = (r["bytes_per_push"], applied, grads)
        rep.row(f"{label}: gradient bytes per applied update", r["bytes_per_push"], "B",
                f"{N} learners x {S} shards{', k=4' if k > 1 else ''}" + (" (shaped link)" if b.hosts else ""))
        rep.row(f"{label}: applied updates/s", applied, "updates/s", f"{grads:,.0f} minibatch gradients/s")
    rep.metrics["bf16_bytes_per_update_ratio"] = res["bfloat16"][0] / res["float32"][0]
    rep.metrics["bf16_updates_per_s_ratio"] = res["bfloat16"][1] / res["float32"][1]
    rep.metrics["grads_per_push4_bytes_per_gradient_ratio"] = (res["k4"][0] / 4) / res["float32"][0]
    rep.metrics["grads_per_push4_gradients_per_s_ratio"] = res["k4"][2] / res["float32"][2]


def curve(b: Bench, rep: Report, points: list) -> None:
    """CurveZMQ on and off: 1 shard, 4 learners with no compute (the encryption is the work)."""
    from gorila_zmq.net import security
    keys = os.path.join(b.tmp, "keys")
    security.gen_keys(keys, ["bench"])
    rates = {}
    for on in (False, True):
        extra = {"curve": True, "keys_dir": keys, "key_name": "bench"} if on else {}
        cfg, path = b.config(1, SIZES["nature"], net=extra)
        with security.use(security.load(keys, "bench") if on else None):     # this driver's own requests
            procs = b.start_shards(cfg, path)
            try:
                r = b.point(cfg, path, procs, 4, 0.0, curve_key=[keys, "bench"] if on else None,
                            sub_per_process=True)
            finally:
                stop(procs)
        r.update(model="nature", variant="curve" if on else "plain")
        points.append(r)
        _print_point(r)
        rates[on] = r["updates_per_s"]
        rep.row(f"CurveZMQ {'on' if on else 'off'}: 4 learners -> 1 shard, Nature DQN, no compute", r["updates_per_s"],
                "updates/s", f"{b.args.io_threads} I/O thread(s)")
    rep.metrics["curve_vs_plain_updates_ratio"] = rates[True] / rates[False]


def run(args) -> Report:
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    rep = Report()
    b = Bench(args)
    skip = set(args.skip.split(",")) - {""}
    points: list[dict] = []
    hosts = None
    try:
        if args.netns:
            from gorila_zmq.bench._netns import Hosts
            hosts = Hosts(["ps_a", "ps_b", "load_a", "load_b"], rate=args.link, delay_ms=args.delay_ms).__enter__()
            b.hosts = hosts
            rep.notes.append(f"4 namespace hosts, every link {args.link} (tc tbf)" +
                             (f", {args.delay_ms} ms netem delay" if hosts.delay_applied else
                              ", no added delay (this kernel has no sch_netem)"))
        t0 = time.monotonic()
        costs = calibrate(b, rep)
        if "sweep" not in skip:
            sweep(b, rep, costs, points)
        if "fanout" not in skip:
            fanout(b, rep, costs, points)
        if "paper" not in skip:
            paper(b, rep, costs, points)
        if "dtype" not in skip:
            dtypes(b, rep, points)
        if "curve" not in skip and not args.netns:
            curve(b, rep, points)
        rep.metrics["wall_s"] = time.monotonic() - t0
        rep.extra = {"costs": model.asdict(costs), "points": points}
        if args.points_json:
            with open(args.points_json, "w") as f:
                json.dump({"costs": model.asdict(costs), "points": points}, f, indent=1)
        if args.plot:
            plot(points, args.plot)
            rep.notes.append(f"plot: {args.plot}")
    finally:
        if hosts is not None:
            hosts.__exit__(None, None, None)
        b.ctx.destroy(linger=0)
        shutil.rmtree(b.tmp, ignore_errors=True)
    rep.notes.append(f"{b.cores} cores; {args.procs} load processes hold the synthetic learners as threads, each "
                     "with a relay process (sockets and processes per point are in each point's record)")
    return rep


def plot(points: list, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'gorila-zmq[docs]'") from None
    sweep_pts = [p for p in points if "error_updates" in p and "variant" not in p]     # the sweep's own
    groups = sorted({(p["model"], p["update_ms"]) for p in sweep_pts})
    fig, axes = plt.subplots(2, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 7), squeeze=False)
    for col, (m, ms) in enumerate(groups):
        for S in sorted({p["shards"] for p in sweep_pts if p["model"] == m and p["update_ms"] == ms}):
            pts = sorted((p for p in sweep_pts if p["model"] == m and p["update_ms"] == ms and p["shards"] == S),
                         key=lambda p: p["learners"])
            xs = [p["learners"] for p in pts]
            line, = axes[0][col].plot(xs, [p["updates_per_s"] for p in pts], "o-", label=f"{S} shard(s)")
            axes[0][col].plot(xs, [p["predicted_updates_per_s"] for p in pts], "--", color=line.get_color(), alpha=0.6)
            axes[1][col].plot(xs, [p.get("staleness_p50", 0) for p in pts], "o-", color=line.get_color())
            axes[1][col].plot(xs, [p["predicted_staleness_p50"] for p in pts], "--", color=line.get_color(), alpha=0.6)
        axes[0][col].set_title(f"{m}, {ms:g} ms per update")
        axes[0][col].set_ylabel("applied updates/s (dashed: model)")
        axes[1][col].set_ylabel("staleness p50, updates (dashed: model)")
        axes[1][col].set_xlabel("learners")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
