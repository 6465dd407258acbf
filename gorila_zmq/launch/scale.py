"""What a layout of shards and learners will do before it is rented: a cost model of the parameter
server, driven by per-message and per-byte costs that `gorila-zmq bench scale` measures.

A learner computes for `update_ms` (a delay), spends its own CPU narrowing and sending the gradient,
then pushes; with a window of two pushes in flight per shard a shard's queue never runs dry, so the
applied rate is (a smooth minimum, the 2-norm of the inverses, for the queueing near the knee) the
smallest of what the learners generate and what each resource serves:

    learners            N / (update_ms x grads_per_push + the learner's own send time [+ its NIC])
    shard CPU           1 / (msg + elem x n/S) per shard: the main loop is one thread
    box CPU (one host)  (cores - the fan-out's share) / (every shard's and client's CPU per push)
    shard link in       link / (gradient bytes per shard)               (cluster)

A message's cost grows with the shard processes sharing a box and with the learners per shard; the
bench measures both. The broadcast fan-out (subscribers x slice x broadcast rate) is not a bound on
updates: ZeroMQ's PUB drops what a slow subscriber cannot take, so past the publisher's I/O thread,
its link or (one box) half the cores, the subscribers see a fraction of the broadcasts and their view
of theta lags. Staleness in updates is the applied rate times the time from reading theta to the push
being applied (compute, plus the wait behind the pushes queued at the shard: a learner reads theta
once its window has room, so when the shards are the limit about N x (window - 1) pushes are ahead
of it), plus half the updates between the broadcasts a learner receives. A count bound (`max_staleness`) discards what exceeds it,
which lowers the applied rate and with it the staleness (a fixed point); an age bound
(`max_staleness_s`) discards what waited longer.

`predict(Layout(...), Costs(...))` answers one layout; `main` is `gorila-zmq scale plan`. Costs default
to what the bench measured on a 2-core AMD EPYC box (docs/bench/scale.json); `--costs FILE` takes
yours. Its known weak spot: on one box, many learners with large gradients in flight (64+ learners x
6.7 MB) cost more per byte than the calibration saw (docs/SCALING.md).
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace


@dataclass
class Costs:
    """CPU seconds per unit, measured by `gorila-zmq bench scale` (its calibration phase)."""
    shard_msg_s: float = 257e-6       # shard: per gradient message (parse, validate, reply, poll)
    shard_msg_per_shard_s: float = 8.7e-6     # ... more per message for each other shard process on the box
    shard_msg_per_learner_s: float = 0.0   # ... more per message for each other learner connected
    shard_elem_s: float = 2.96e-9     # shard: per float32 gradient element (receive, finite check, AdaGrad)
    client_msg_s: float = 305e-6      # client: per slice message (header, send, reply handling)
    client_msg_per_shard_s: float = 0.0    # ... more per message for each other shard process on the box
    client_msg_per_learner_s: float = 11.7e-6  # ... more per message for each other learner in its process
    client_elem_s: float = 1.99e-9    # client: per gradient element sent (+ its theta copy)
    pub_byte_s: float = 0.36e-9      # shard host: per byte published, per subscriber (the PUB's I/O thread)
    sub_byte_s: float = 0.60e-9      # subscriber: per byte received (I/O thread + the copy into theta)
    note: str = "defaults: bench scale calibration, 2-core AMD EPYC, 2026-12-01"

    @classmethod
    def load(cls, path: str) -> "Costs":
        with open(path) as f:
            d = json.load(f)
        d = d.get("costs", d)
        if "metrics" in d and "costs" not in d:
            d = {k.removeprefix("cost_"): v for k, v in d["metrics"].items() if k.startswith("cost_")}
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Layout:
    learners: int
    shards: int
    params: int                        # floats in theta
    update_ms: float = 20.0            # a learner's compute per minibatch gradient
    subscribers: int | None = None     # parameter subscribers (default: one per learner)
    actors: int = 0                    # actors subscribe too (added to subscribers when those are default)
    grad_bytes: int = 4                # bytes per gradient element on the wire (2: bfloat16/float16)
    grads_per_push: int = 1
    window: int = 2                    # net.in_flight
    broadcast_every: int = 10
    broadcast_interval_ms: float = 100.0
    broadcast_min_interval_ms: float = 0.0
    max_staleness: int = 0             # count bound (0: off)
    max_staleness_s: float = 0.0       # age bound (0: off)
    staleness_factor: float = 0.0      # age bound at this many times the median age, if longer (0: off)
    cores: int = 2                     # one box: its cores; cluster: cores of each shard host
    client_procs: int = 2              # one box: processes the learners run in
    link_bps: float | None = None      # None: one box (loopback); else every host's NIC, bits/s
    cluster: bool = False              # each shard and each learner on a host of its own
    shard_hosts: int = 0               # one box split into hosts on shaped links (bench scale --netns):
    load_hosts: int = 0                # the hosts the shards and the learners are spread over


@dataclass
class Prediction:
    updates_per_s: float               # applied, global (shard 0's version rate)
    pushes_per_s: float                # per shard: applied + discarded
    staleness_p50: float               # updates
    age_p50_ms: float
    discard_fraction: float
    shard_bytes_in_per_s: float
    shard_bytes_out_per_s: float
    learner_bytes_out_per_s: float
    broadcasts_per_s: float            # per shard
    bottleneck: str
    utilization: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _broadcast_rate(x: float, lay: Layout) -> float:
    """Broadcast rounds per second of one shard at `x` applied updates/s."""
    if x <= 0:
        return 0.0
    rate = max(x / lay.broadcast_every, min(x, 1000.0 / lay.broadcast_interval_ms))
    if lay.broadcast_min_interval_ms > 0:
        rate = min(rate, 1000.0 / lay.broadcast_min_interval_ms)
    return rate


def predict(lay: Layout, costs: Costs | None = None) -> Prediction:
    """Throughput is the smallest of what the learners generate and what each resource can serve (with
    a window of >= 2 pushes in flight a shard's queue never runs dry, so the bounds are reached);
    staleness follows from where the pushes wait."""
    c = costs or Costs()
    n, S, N, w = lay.params, lay.shards, lay.learners, lay.window
    M = lay.subscribers if lay.subscribers is not None else N + lay.actors
    slice_elems = n / S
    grad_scale = lay.grad_bytes / 4.0
    # per message costs grow with the processes sharing a box and the peers of a socket (measured)
    procs_here = 0 if lay.cluster else S - 1
    per_proc = max(1, -(-N // lay.client_procs)) - 1 if not lay.cluster else 0
    client_msg = c.client_msg_s + c.client_msg_per_shard_s * procs_here + c.client_msg_per_learner_s * per_proc
    learner_cpu = S * client_msg + c.client_elem_s * n * (0.5 + 0.5 * grad_scale)         # per push, serial
    think = lay.update_ms / 1000.0 * lay.grads_per_push + learner_cpu
    shard_msg = c.shard_msg_s + c.shard_msg_per_shard_s * procs_here + c.shard_msg_per_learner_s * (N - 1)
    shard_main = shard_msg + c.shard_elem_s * slice_elems                                # per push, each shard
    bw = lay.link_bps / 8.0 if lay.link_bps else None
    if bw and lay.cluster:
        think += lay.grad_bytes * n / bw                  # the learner's own NIC sends its gradient
    x_applied, p_apply = min(N / think, 1.0 / shard_main), 1.0
    for _ in range(200):                                  # fixed point in the update rate
        rb = _broadcast_rate(x_applied, lay)
        fan_bytes = rb * M * 4 * n                         # all shards' broadcasts, per second
        bounds = {"learner compute (update_ms)": N / think, "shard CPU": 1.0 / shard_main}
        if lay.cluster:
            fan_cpu_shard = rb * M * 4 * slice_elems * c.pub_byte_s      # the shard's I/O thread
            delivered = min(1.0, 1.0 / max(fan_cpu_shard, 1e-12))
            if bw:
                bounds["shard link in"] = bw / (lay.grad_bytes * slice_elems)
                delivered = min(delivered, bw / max(rb * M * 4 * slice_elems, 1e-9), bw / max(rb * 4 * n, 1e-9))
        else:
            if bw and lay.shard_hosts and lay.load_hosts:   # hosts on one box, their links shaped
                bounds["shard hosts' links in"] = bw * min(lay.shard_hosts, S) / (lay.grad_bytes * n)
                used = min(lay.load_hosts, lay.client_procs, N)               # hosts with learners on them
                bounds["learner hosts' links out"] = bw * used / (lay.grad_bytes * n)
            fan_cpu = fan_bytes * (c.pub_byte_s + c.sub_byte_s)
            # ZeroMQ's PUB drops what a slow subscriber cannot take: on a saturated box the fan-out
            # gets what the pushes leave, and at most half the cores (an assumption, see SCALING.md)
            delivered = min(1.0, 0.5 * lay.cores / max(fan_cpu, 1e-12))
            if bw and lay.shard_hosts:
                delivered = min(delivered, bw * lay.shard_hosts / max(fan_bytes, 1e-9))
            fan_cpu *= delivered
            push_cpu = S * shard_msg + c.shard_elem_s * n + learner_cpu
            bounds["box CPU"] = max(lay.cores - fan_cpu, 0.05 * lay.cores) / push_cpu
            bounds["client process"] = lay.client_procs / learner_cpu
        name = min(bounds, key=bounds.get)
        # near the knee learners also queue for what they share: a smooth minimum of the bounds (the
        # 2-norm of their inverses) instead of the hard one, which only the asymptotes reach
        x_push = sum(v ** -2.0 for v in bounds.values()) ** -0.5
        # a learner reads theta once its window has room, so when the shards are the limit about
        # N x (window - 1) pushes are ahead of its next one; none when the learners are
        ahead = min(N * (w - 1.0), max(0.0, N * w - x_push * w * think))
        wait = shard_main + ahead / x_push
        lag = _lag_updates(x_push * p_apply, rb * delivered, lay)
        p_new = _p_apply(N, x_push, p_apply, wait, lag, lay)
        x_new = x_push * p_new
        done = abs(x_new - x_applied) < 1e-7 * max(x_new, 1.0) and abs(p_new - p_apply) < 1e-7
        x_applied, p_apply = (x_new, p_new) if done else (0.5 * (x_applied + x_new), 0.5 * (p_apply + p_new))
        if done:
            break
    x_push = x_applied / p_apply
    stale_t = lay.update_ms / 1000.0 * lay.grads_per_push + wait
    staleness = x_applied * stale_t + lag
    util = {k: x_push / v for k, v in bounds.items()}
    bottleneck = name if name != "learner compute (update_ms)" else name
    if delivered < 0.999:
        bottleneck += f"; the broadcast fan-out reaches only {delivered:.0%} of its subscribers"
    return Prediction(updates_per_s=x_applied, pushes_per_s=x_push, staleness_p50=staleness,
                      age_p50_ms=1000.0 * (stale_t + lag / max(x_applied, 1e-9)), discard_fraction=1.0 - p_apply,
                      shard_bytes_in_per_s=x_push * lay.grad_bytes * slice_elems,
                      shard_bytes_out_per_s=delivered * rb * M * 4 * slice_elems,
                      learner_bytes_out_per_s=x_push / N * lay.grad_bytes * n, broadcasts_per_s=rb,
                      bottleneck=bottleneck, utilization={k: round(v, 3) for k, v in util.items()})


def _lag_updates(x: float, seen_rate: float, lay: Layout) -> float:
    """Updates a learner's view lags its shard by, on the median: half the updates between the
    broadcasts it receives."""
    if x <= 0 or seen_rate <= 0:
        return 0.0
    return max(0.0, (x / seen_rate - 1.0) / 2.0)


def _p_apply(N: int, x_push: float, p: float, wait: float, lag: float, lay: Layout) -> float:
    """The fraction of pushes a staleness policy accepts. Staleness is spread about its median by the
    broadcast lag (uniform over one broadcast period), so a count bound cuts into that spread; an age
    bound discards pushes that waited longer than it."""
    ok = 1.0
    if lay.max_staleness:
        center = p * x_push * (lay.update_ms / 1000.0 * lay.grads_per_push + wait) + lag
        spread = max(1.0, 2.0 * lag)
        ok = min(1.0, max(0.0, (lay.max_staleness + 0.5 - (center - spread / 2.0)) / spread))
    if lay.max_staleness_s or lay.staleness_factor:
        # an honest gradient's age; the adaptive bound sits at `staleness_factor` x it (>= 2 x the
        # median: the model's spread about the median is half a broadcast period, so none is cut)
        age = lay.update_ms / 1000.0 * lay.grads_per_push + wait + lag / max(p * x_push, 1e-9)
        bound = max(lay.max_staleness_s, lay.staleness_factor * age)
        ok *= 1.0 if age <= bound else bound / age
    return max(ok, 1e-3)


def shards_needed(lay: Layout, costs: Costs | None = None, target: float = 0.9) -> int:
    """The fewest shards at which the layout reaches `target` of the rate its learners could drive
    with unlimited shards (the paper's 31 shards for 100 learners is the question this answers)."""
    best = predict(replace(lay, shards=min(256, lay.params)), costs).updates_per_s
    for s in range(1, 257):
        if predict(replace(lay, shards=s), costs).updates_per_s >= target * best:
            return s
    return 256


# -- gorila-zmq scale plan ----------------------------------------------------------------------

_SI = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def _number(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgKMG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 1.69M, 7260000, 1e6)")
    return float(m.group(1)) * _SI[m.group(2).lower()]


def _link(text: str) -> float | None:
    if text in ("box", "loopback", "none"):
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?)(bit|b)(?:/s|ps)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a link speed: {text!r} (e.g. 1gbit, 10gbit, 100gbit, box)")
    return float(m.group(1)) * _SI[m.group(2)]


def format_prediction(lay: Layout, p: Prediction) -> str:
    where = (f"cluster, {lay.link_bps / 1e9:g} Gb/s links" if lay.cluster and lay.link_bps else
             "cluster, unlimited links" if lay.cluster else f"one box of {lay.cores} cores")
    return "\n".join([
        f"layout: {lay.learners} learners x {lay.shards} shards, {lay.params:,.0f} params, {lay.update_ms:g} ms per "
        f"update, {where}",
        f"  applied updates/s (global)  {p.updates_per_s:12,.1f}",
        f"  pushes/s per shard          {p.pushes_per_s:12,.1f}",
        f"  staleness p50 (updates)     {p.staleness_p50:12,.1f}   age p50 {p.age_p50_ms:,.1f} ms",
        f"  discarded as stale          {100 * p.discard_fraction:11.1f}%",
        f"  per shard: in {p.shard_bytes_in_per_s / 1e6:,.1f} MB/s, out {p.shard_bytes_out_per_s / 1e6:,.1f} MB/s "
        f"({p.broadcasts_per_s:,.1f} broadcasts/s)",
        f"  per learner: out {p.learner_bytes_out_per_s / 1e6:,.1f} MB/s",
        f"  bottleneck: {p.bottleneck}  (utilisation: "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(p.utilization.items(), key=lambda kv: -kv[1])) + ")"])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq scale", description="Predict what a layout of shards and learners "
                                "will do (throughput, staleness, bandwidth, the bottleneck) from measured costs.")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("plan", help="predict one layout")
    q.add_argument("--learners", type=int, required=True)
    q.add_argument("--shards", type=int, required=True)
    q.add_argument("--params", type=_number, required=True, help="floats in theta: 1.69M (Nature DQN), 7.26M (DrQ-v2)")
    q.add_argument("--update-ms", type=float, default=20.0, help="a learner's compute per gradient (CPU ~18, GPU ~2.5)")
    q.add_argument("--link", type=_link, default=None, help="every host's link: 1gbit, 10gbit, 100gbit; omit for one box")
    q.add_argument("--actors", type=int, default=None, help="actors subscribing too (default: as many as learners)")
    q.add_argument("--grad-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    q.add_argument("--grads-per-push", type=int, default=1)
    q.add_argument("--broadcast-every", type=int, default=10)
    q.add_argument("--broadcast-interval-ms", type=float, default=100.0)
    q.add_argument("--broadcast-min-interval-ms", type=float, default=0.0)
    q.add_argument("--max-staleness", type=int, default=0, help="count bound (0: off)")
    q.add_argument("--max-staleness-s", type=float, default=0.0, help="age bound (0: off)")
    q.add_argument("--staleness-factor", type=float, default=0.0, help="adaptive age bound (0: off)")
    q.add_argument("--cores", type=int, default=2, help="one box: its cores")
    q.add_argument("--costs", help="a `gorila-zmq bench scale --json` file (its measured costs)")
    q.add_argument("--json", action="store_true", help="print the prediction as JSON")
    a = p.parse_args(argv)
    if a.learners < 1 or a.shards < 1 or a.params < a.shards:
        p.error("need --learners >= 1 and 1 <= --shards <= --params")
    cluster = a.link is not None
    lay = Layout(learners=a.learners, shards=a.shards, params=int(a.params), update_ms=a.update_ms,
                 actors=a.learners if a.actors is None else a.actors, grad_bytes=4 if a.grad_dtype == "float32" else 2,
                 grads_per_push=a.grads_per_push, broadcast_every=a.broadcast_every,
                 broadcast_interval_ms=a.broadcast_interval_ms, broadcast_min_interval_ms=a.broadcast_min_interval_ms,
                 max_staleness=a.max_staleness, max_staleness_s=a.max_staleness_s,
                 staleness_factor=a.staleness_factor, cores=a.cores, link_bps=a.link,
                 cluster=cluster)
    costs = Costs.load(a.costs) if a.costs else Costs()
    pred = predict(lay, costs)
    if a.json:
        print(json.dumps({"layout": asdict(lay), "prediction": pred.as_dict()}, indent=1))
    else:
        print(format_prediction(lay, pred))
        need = shards_needed(lay, costs)
        print(f"  shards for 90% of what more shards would give: {need}")
    return 0 if math.isfinite(pred.updates_per_s) else 1
