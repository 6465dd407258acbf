"""The client side of the parameter server: gradient pusher, parameter subscriber, blocking fetch.

- `GradientPusher`: splits a flat gradient into shard slices and sends each (copy=False) over a DEALER,
  keeping at most `net.in_flight` requests outstanding per shard; every reply is accounted (applied /
  stale / duplicate / rejected) and a request without a reply is resent on a new socket (Lazy Pirate)
  up to `net.request_retries` times, then counted lost. Retries reuse (client, seq), so the shard
  applies a push at most once.
- `ParamSubscriber`: a background thread (zguide Clone agent): subscribe to every shard's PUB first,
  then take a snapshot of each, then apply only newer broadcasts. `latest()` never blocks on the
  network. A shard silent for `heartbeat_liveness` intervals is marked dead; the thread reconnects
  with backoff 1 -> 32 s and re-snapshots when the shard is back (a new incarnation always means a
  re-snapshot: a restarted shard's version may go backwards).
- `fetch_params`: the exact current theta, for target-network syncs.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from gorila_zmq.net import protocol as P, topology
from gorila_zmq.net.rpc import Unavailable, Window, new_client_id, request
from gorila_zmq.ps.layout import ParamLayout

log = logging.getLogger("gorila_zmq.client")


class ShardSet:
    """What a client knows about the shards of one model: endpoints and slice ranges."""

    def __init__(self, cfg, layout: ParamLayout):
        self.cfg, self.layout = cfg, layout
        self.n = cfg.ps.shards
        self.ranges = layout.shard_ranges(self.n)
        self.req = [topology.ps_request(cfg, i).connect for i in range(self.n)]
        self.pub = [topology.ps_broadcast(cfg, i).connect for i in range(self.n)]

    def hello(self, ctx, i: int, client: int = 0, timeout_s: float | None = None) -> dict:
        """Check the layout with shard i; a mismatch raises ProtocolError(BAD_LAYOUT) with the reason."""
        hdr = P.Header(P.Cmd.HELLO, shard=i, client=client, layout=self.layout.hash)
        rhdr, body = request(ctx, self.req[i], hdr, {"layout_hash": self.layout.hash, "n_params": self.layout.size},
                             timeout_s=timeout_s or self.cfg.net.request_timeout_s, retries=self.cfg.net.request_retries)
        return P.as_json(rhdr, body)

    def stats(self, ctx, i: int, timeout_s: float = 2.0, retries: int = 0) -> dict:
        rhdr, body = request(ctx, self.req[i], P.Header(P.Cmd.STATS, shard=i, layout=self.layout.hash),
                             timeout_s=timeout_s, retries=retries)
        return P.as_json(rhdr, body)


def fetch_params(ctx: zmq.Context, shards: ShardSet, out: np.ndarray | None = None,
                 timeout_s: float | None = None) -> tuple[np.ndarray, list[int]]:
    """Blocking snapshot of the full theta from every shard: (theta, per-shard versions)."""
    out = np.empty(shards.layout.size, np.float32) if out is None else out
    versions = []
    for i, (a, b) in enumerate(shards.ranges):
        rhdr, body = request(ctx, shards.req[i], P.Header(P.Cmd.GET_PARAMS, shard=i, layout=shards.layout.hash),
                             timeout_s=timeout_s or shards.cfg.net.request_timeout_s,
                             retries=shards.cfg.net.request_retries)
        out[a:b] = P.as_array(rhdr, body, P.Dtype.FLOAT32, b - a)
        versions.append(rhdr.pversion)
    return out, versions


# -- gradient pusher ----------------------------------------------------------------------------

@dataclass
class PushStats:
    sent: int = 0          # distinct pushes (retries not counted); the counts below are per shard slice
    applied: int = 0       # (a retry of a push the shard already decided gets the first outcome back)
    stale: int = 0
    rejected: int = 0
    lost: int = 0          # no reply after every retry
    retries: int = 0
    by_shard: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class GradientPusher:
    def __init__(self, ctx: zmq.Context, shards: ShardSet, client_id: int | None = None,
                 socket_options=None, hello: bool = True, record: bool = False):
        self.ctx, self.shards = ctx, shards
        # With record=True, every applied slice is logged as (shard, seq, version after applying):
        # the shard's version orders its updates, so tests can replay them serially.
        self.applied_log: list[tuple[int, int, int]] | None = [] if record else None
        net = shards.cfg.net
        self.window, self.timeout, self.retries = net.in_flight, net.request_timeout_s, net.request_retries
        self.client = client_id or new_client_id()
        self._socket_options = socket_options
        self.seq = 0
        self.stats = PushStats(by_shard={i: {"applied": 0, "stale": 0, "rejected": 0, "lost": 0}
                                         for i in range(shards.n)})
        self.versions = [0] * shards.n           # latest version each shard reported
        self.incarnations = [0] * shards.n
        self.pending = [Window(self.window, self.timeout, self.retries) for _ in range(shards.n)]
        self.abandoned: dict[int, None] = {}    # pushes given up on some shard (the latest 1,024): reusable()
        self._logged: set = set()
        self.socks: list[zmq.Socket] = [self._connect(i) for i in range(shards.n)]
        if hello:
            for i in range(shards.n):
                info = shards.hello(ctx, i, self.client)
                self.versions[i], self.incarnations[i] = info["version"], info["incarnation"]

    def _connect(self, i: int) -> zmq.Socket:
        s = P.make_socket(self.ctx, zmq.DEALER, sndhwm=self.window + 1)
        if self._socket_options:
            self._socket_options(s)
        s.connect(self.shards.req[i])
        return s

    def push(self, grad: np.ndarray, versions: list[int]) -> int:
        """Send `grad` (flat float32, length layout.size) computed against per-shard `versions`.
        Blocks only while a shard's window is full. The pusher keeps a reference to `grad` until
        every slice is answered: modify it only once reusable(seq) is True, and never after False.
        Returns the push's sequence number."""
        if grad.dtype != np.float32 or grad.shape != (self.shards.layout.size,):
            raise ValueError(f"gradient must be float32 of shape ({self.shards.layout.size},), "
                             f"got {grad.dtype} {grad.shape}")
        self.seq += 1
        for i, (a, b) in enumerate(self.shards.ranges):
            while self.pending[i].full():
                self.poll(timeout_s=min(0.1, self.timeout), shard=i)
            hdr = P.Header(P.Cmd.PUSH_GRAD, shard=i, client=self.client, seq=self.seq,
                           pversion=versions[i], layout=self.shards.layout.hash)
            frames = P.message(hdr, grad[a:b])
            self.socks[i].send_multipart(frames, copy=False)
            self.pending[i].sent(self.seq, frames)
        self.stats.sent += 1
        return self.seq

    def poll(self, timeout_s: float = 0.0, shard: int | None = None) -> int:
        """Handle every reply that is ready (waiting up to timeout_s for the first); resend or give up
        requests that timed out. Returns the number of replies handled."""
        poller = zmq.Poller()
        for i, s in enumerate(self.socks):
            if self.pending[i]:
                poller.register(s, zmq.POLLIN)
        handled = 0
        for s, _ in poller.poll(int(timeout_s * 1000)) if poller.sockets else []:
            i = self.socks.index(s)
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                handled += self._on_reply(i, frames)
        self._check_timeouts()
        return handled

    def _on_reply(self, i: int, frames) -> int:
        try:
            hdr, body = P.parse(frames)
        except P.ProtocolError as e:
            log.warning("shard %d sent a malformed reply: %s", i, e)
            return 0
        if not self.pending[i].answered(hdr.seq):
            return 0   # a late reply to a request already retried and answered
        self.versions[i], self.incarnations[i] = hdr.pversion, hdr.incarnation
        st = hdr.status
        per = self.stats.by_shard[i]
        if hdr.command == P.Cmd.ERROR:
            self.stats.rejected += 1
            per["rejected"] += 1
            try:
                detail = P.as_json(hdr, body).get("detail", "") if body is not None else ""
            except P.ProtocolError:
                detail = "(unreadable detail)"
            kind = (i, st)
            level = logging.DEBUG if kind in self._logged else logging.WARNING
            self._logged.add(kind)
            log.log(level, "shard %d rejected push %d: %s %s (later ones of this kind at debug level)",
                    i, hdr.seq, P.Status(st).name, detail)
        elif st == P.Status.APPLIED:
            self.stats.applied += 1
            per["applied"] += 1
            if self.applied_log is not None:
                self.applied_log.append((i, hdr.seq, hdr.pversion))
        elif st == P.Status.STALE:
            self.stats.stale += 1
            per["stale"] += 1
        return 1

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for i, pend in enumerate(self.pending):
            if not pend.expired(now):
                continue
            # Lazy Pirate: a fresh socket, resend everything in flight (same client/seq: idempotent).
            self.socks[i].close(linger=0)
            self.socks[i] = self._connect(i)
            lost = pend.resend(self.socks[i])
            self.stats.retries += len(pend)
            for seq in lost:
                self.abandoned[seq] = None
                if len(self.abandoned) > 1024:
                    del self.abandoned[next(iter(self.abandoned))]
                self.stats.lost += 1
                self.stats.by_shard[i]["lost"] += 1
                log.warning("push %d to shard %d lost after %d retries", seq, i, self.retries)

    def in_flight(self) -> int:
        return sum(len(p) for p in self.pending)

    def answered(self, seq: int) -> bool:
        """True once no shard has push `seq` in flight (answered or given up)."""
        return all(seq not in pend for pend in self.pending)

    def reusable(self, seq: int) -> bool | None:
        """May the caller rewrite the gradient it pushed as `seq`? None while a shard still has it in
        flight; True once every shard answered it; False for a push given up on some shard (of the
        latest 1,024 given up). The last is never safe to rewrite: its frames were sent with
        copy=False on a socket closed with linger 0, and libzmq's I/O thread may still be reading them
        (linger drops the queue, not a write in progress). pyzmq holds the memory until libzmq lets
        go, so the caller drops its own reference and uses a fresh buffer."""
        if not self.answered(seq):
            return None
        return seq not in self.abandoned

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every push is answered or given up; True if nothing is left in flight."""
        end = time.monotonic() + timeout_s
        while self.in_flight() and time.monotonic() < end:
            self.poll(timeout_s=0.05)
        return self.in_flight() == 0

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.socks = []


# -- parameter subscriber -----------------------------------------------------------------------

class ParamSubscriber:
    """Background thread keeping the latest complete theta. Thread-safe readers: latest(), versions."""

    def __init__(self, ctx: zmq.Context, shards: ShardSet, socket_options=None, hwm: int | None = None):
        self.ctx, self.shards = ctx, shards
        net = shards.cfg.net
        self.hb_interval, self.liveness = net.heartbeat_interval_s, net.heartbeat_liveness
        self.backoff_max, self.timeout = net.reconnect_max_s, net.request_timeout_s
        self.hwm = hwm if hwm is not None else net.sub_hwm
        self._socket_options = socket_options
        n = shards.n
        self._theta = np.zeros(shards.layout.size, np.float32)
        self._lock = threading.Lock()
        self.versions = [-1] * n            # -1: no snapshot yet
        self.incarnations = [0] * n
        self.alive = [False] * n
        self.last_seen = [0.0] * n
        self.updates = 0                    # increments whenever any slice changes
        self.counters = {"broadcasts": 0, "applied": 0, "ignored_old": 0, "snapshots": 0, "gaps": 0,
                         "reconnects": 0, "malformed": 0, "dead_events": 0}
        self.latency_ns: list[int] = []     # broadcast delivery latencies (same-host clocks)
        self.record_latency = False
        self._bseq = [0] * n
        self._said: set = set()
        self.error: str | None = None       # the last unexpected error of the thread (it carries on)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="param-subscriber", daemon=True)
        self._thread.start()

    # -- readers --------------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        return self._ready.wait(timeout_s)

    def latest(self, out: np.ndarray | None = None) -> tuple[np.ndarray, list[int], int]:
        """A consistent copy of the latest theta, the per-shard versions, and the update counter."""
        with self._lock:
            if out is None:
                out = self._theta.copy()
            else:
                np.copyto(out, self._theta)
            return out, list(self.versions), self.updates

    @property
    def global_version(self) -> int:
        """Shard 0's version: the global update count (Gorila's N)."""
        return self.versions[0]

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    # -- the agent thread -----------------------------------------------------------------------
    def _new_sub(self, i: int) -> zmq.Socket:
        s = P.make_socket(self.ctx, zmq.SUB, rcvhwm=self.hwm)
        if self._socket_options:
            self._socket_options(s)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(self.shards.pub[i])
        return s

    def _snapshot(self, i: int) -> bool:
        a, b = self.shards.ranges[i]
        try:
            rhdr, body = request(self.ctx, self.shards.req[i],
                                 P.Header(P.Cmd.GET_PARAMS, shard=i, layout=self.shards.layout.hash),
                                 timeout_s=min(self.timeout, 2.0), retries=0,
                                 socket_options=self._socket_options)
            arr = P.as_array(rhdr, body, P.Dtype.FLOAT32, b - a)
        except (Unavailable, P.ProtocolError) as e:
            if isinstance(e, P.ProtocolError) and e.status == P.Status.BAD_LAYOUT and "layout" not in self._said:
                self._said.add("layout")
                log.error("shard %d runs another model than this process: %s", i, e.detail)
            log.debug("snapshot of shard %d failed: %s", i, e)
            return False
        with self._lock:
            self._theta[a:b] = arr
            self.versions[i], self.incarnations[i] = rhdr.pversion, rhdr.incarnation
            self.updates += 1
        self.counters["snapshots"] += 1
        self.alive[i], self.last_seen[i] = True, time.monotonic()
        if all(v >= 0 for v in self.versions):
            self._ready.set()
        return True

    def _run(self) -> None:
        n = self.shards.n
        subs = [self._new_sub(i) for i in range(n)]      # subscribe first ...
        need_snapshot = [True] * n                        # ... then snapshot, then apply newer
        next_try = [0.0] * n
        backoff = [1.0] * n
        dead_after = self.liveness * self.hb_interval
        poller = zmq.Poller()
        for s in subs:
            poller.register(s, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    self._once(subs, poller, need_snapshot, next_try, backoff, dead_after)
                except Exception as e:  # noqa: BLE001 - the thread must outlive any one bad event
                    self.error = f"{type(e).__name__}: {e}"
                    self.counters["errors"] = self.counters.get("errors", 0) + 1
                    if self.counters["errors"] == 1:
                        log.exception("parameter subscriber: unexpected error (it carries on)")
                    time.sleep(0.1)
        finally:
            for s in subs:
                s.close(linger=0)

    def _once(self, subs, poller, need_snapshot, next_try, backoff, dead_after) -> None:
        """One turn of the agent loop: snapshots due, broadcasts waiting, liveness."""
        n = self.shards.n
        now = time.monotonic()
        for i in range(n):
            if need_snapshot[i] and now >= next_try[i]:
                if self._snapshot(i):
                    need_snapshot[i], backoff[i] = False, 1.0
                else:
                    next_try[i] = now + backoff[i]
                    backoff[i] = min(backoff[i] * 2, self.backoff_max)
        for s, _ in poller.poll(100):
            i = subs.index(s)
            for _ in range(16):
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if self._on_broadcast(i, frames):
                    need_snapshot[i] = True
                    next_try[i] = 0.0
        now = time.monotonic()
        for i in range(n):
            if self.alive[i] and now - self.last_seen[i] > dead_after:
                # Paranoid Pirate: silent for `liveness` intervals -> dead. New socket, and a
                # fresh snapshot once it answers again (with backoff).
                log.warning("shard %d silent for %.1fs: marking dead, reconnecting", i, now - self.last_seen[i])
                self.alive[i] = False
                self.counters["dead_events"] += 1
                self.counters["reconnects"] += 1
                poller.unregister(subs[i])
                subs[i].close(linger=0)
                subs[i] = self._new_sub(i)
                poller.register(subs[i], zmq.POLLIN)
                need_snapshot[i], next_try[i] = True, now + backoff[i]

    def _on_broadcast(self, i: int, frames) -> bool:
        """Apply one PUB message; True when the shard needs a re-snapshot."""
        try:
            hdr, body = P.parse(frames)
            if hdr.shard != i or hdr.layout != self.shards.layout.hash:
                raise P.ProtocolError(P.Status.BAD_LAYOUT, "broadcast for another shard or model")
        except P.ProtocolError:
            self.counters["malformed"] += 1
            return False
        now = time.monotonic()
        self.last_seen[i] = now
        if not self.alive[i] and self.versions[i] >= 0 and hdr.incarnation == self.incarnations[i]:
            self.alive[i] = True
        if hdr.incarnation != self.incarnations[i]:
            return True                    # restarted shard (or first contact): snapshot it
        if hdr.command == P.Cmd.HEARTBEAT:
            # The broadcast of the newest version was dropped (slow subscriber, HWM): re-snapshot.
            if hdr.pversion > self.versions[i]:
                self.counters["gaps"] += 1
                return True
            return False
        if hdr.command != P.Cmd.PARAMS:
            self.counters["malformed"] += 1
            return False
        self.counters["broadcasts"] += 1
        if self.record_latency:
            self.latency_ns.append(time.monotonic_ns() - hdr.stamp_ns)
        if self._bseq[i] and hdr.seq != self._bseq[i] + 1:
            # A gap: each broadcast carries the whole slice, so the newer one *is* the re-snapshot.
            self.counters["gaps"] += 1
        self._bseq[i] = hdr.seq
        if hdr.pversion <= self.versions[i]:
            self.counters["ignored_old"] += 1
            return False
        a, b = self.shards.ranges[i]
        try:
            arr = P.as_array(hdr, body, P.Dtype.FLOAT32, b - a)
        except P.ProtocolError:
            self.counters["malformed"] += 1
            return False
        with self._lock:
            self._theta[a:b] = arr
            self.versions[i] = hdr.pversion
            self.updates += 1
        self.counters["applied"] += 1
        return False
