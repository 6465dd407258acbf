"""The client side of the parameter server: gradient pusher, parameter subscriber, blocking fetch.

- `GradientPusher`: splits a flat gradient into shard slices and sends each (copy=False) over a DEALER,
  keeping at most `net.in_flight` requests outstanding per shard; every reply is accounted (applied /
  stale / duplicate / rejected) and a request without a reply is resent on a new socket (Lazy Pirate)
  up to `net.request_retries` times, then counted lost. Retries reuse (client, seq), so the shard
  applies a push at most once. With `net.grad_dtype` bfloat16 or float16 the gradient is narrowed once
  per push (half the bytes on the wire); the shard widens it back and applies in float32. To a shard
  on the same host (`net.shm_push=auto`) a push whose gradient lies in one of `segments`' buffers
  carries only the buffer's name and the slice's offset (ps/local.py); it stays float32.
- `ParamSubscriber` (ps/subscriber.py): a background thread (zguide Clone agent): subscribe to every
  shard's PUB first, then take a snapshot of each, then apply only newer broadcasts. `latest()` never blocks on the
  network. A shard silent for `heartbeat_liveness` intervals is marked dead; the thread reconnects
  with backoff 1 -> 32 s and re-snapshots when the shard is back (a new incarnation always means a
  re-snapshot: a restarted shard's version may go backwards).
- `fetch_params`: the exact current theta, for target-network syncs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from gorila_zmq.net import protocol as P, topology
from gorila_zmq.net.rpc import Window, new_client_id, request
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.ps.local import GradientSegments, host_identity

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
    local: int = 0         # slices sent as a shared-memory reference (a shard on this host)
    by_shard: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class GradientPusher:
    def __init__(self, ctx: zmq.Context, shards: ShardSet, client_id: int | None = None,
                 socket_options=None, hello: bool = True, record: bool = False, record_staleness: bool = False):
        self.ctx, self.shards = ctx, shards
        # With record=True, every applied slice is logged as (shard, seq, version after applying):
        # the shard's version orders its updates, so tests can replay them serially.
        self.applied_log: list[tuple[int, int, int]] | None = [] if record else None
        # With record_staleness=True, every answered slice adds (shard, staleness in updates, applied?):
        # the updates the shard applied between the theta a push was computed against and its turn.
        self.staleness_log: list[tuple[int, int, bool]] | None = [] if record_staleness else None
        self._pushed_versions: dict[int, list[int]] = {}
        net = shards.cfg.net
        self.wire = P.GRAD_DTYPES[net.grad_dtype]
        self.bytes_sent = 0
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
        self.resnapshot: set[int] = set()        # shards that refused a push as AHEAD: theta must be re-read
        self._logged: set = set()
        self.socks: list[zmq.Socket] = [self._connect(i) for i in range(shards.n)]
        # Shards on this host (their HELLO names the same /dev/shm) read pushes from shared memory
        # (ps/local.py): the learner takes its buffers from `segments` and the message only names them.
        self.local: set[int] = set()
        self.segments: GradientSegments | None = None
        if hello:
            me = host_identity() if net.shm_push != "off" else ""
            for i in range(shards.n):
                info = shards.hello(ctx, i, self.client)
                self.versions[i], self.incarnations[i] = info["version"], info["incarnation"]
                if me and info.get("host") == me:
                    self.local.add(i)
        if self.local:
            self.segments = GradientSegments(shards.cfg.run_id, self.client, shards.layout.size)

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
        seg = self.segments.ref(grad) if self.segments is not None else None
        local = self.local if seg is not None else ()
        wire = None
        if self.staleness_log is not None:
            self._pushed_versions[self.seq] = list(versions)
        for i, (a, b) in enumerate(self.shards.ranges):
            while self.pending[i].full():
                self.poll(timeout_s=min(0.1, self.timeout), shard=i)
            hdr = P.Header(P.Cmd.PUSH_GRAD, shard=i, client=self.client, seq=self.seq,
                           pversion=versions[i], layout=self.shards.layout.hash)
            if i in local:
                hdr.dtype = P.Dtype.SHM_REF
                frames = P.message(hdr, P.shm_ref(seg, 4 * a, b - a))
                self.stats.local += 1
            else:
                if wire is None:     # a new array unless float32: the frames keep it alive
                    wire = P.narrow_floats(grad, self.wire)
                frames = P.message(hdr, wire[a:b])
            self.socks[i].send_multipart(frames, copy=False)
            self.pending[i].sent(self.seq, frames)
            self.bytes_sent += hdr.length
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
            if st == P.Status.AHEAD:
                self.resnapshot.add(i)
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
        if self.staleness_log is not None and hdr.command != P.Cmd.ERROR:
            pushed = self._pushed_versions.get(hdr.seq)
            if pushed is not None:
                applied = st == P.Status.APPLIED   # the reply's version is the one after applying it
                self.staleness_log.append((i, hdr.pversion - applied - pushed[i], applied))
                if self.answered(hdr.seq):
                    del self._pushed_versions[hdr.seq]
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
                self._pushed_versions.pop(seq, None)
                self.abandoned[seq] = None
                if len(self.abandoned) > 1024:
                    del self.abandoned[next(iter(self.abandoned))]
                self.stats.lost += 1
                self.stats.by_shard[i]["lost"] += 1
                log.warning("push %d to shard %d lost after %d retries", seq, i, self.retries)

    def wait_room(self, timeout_s: float | None = None) -> bool:
        """Wait until every shard's window has room for one more push (True), or timeout_s. A learner
        calls this *before* it reads theta: a gradient computed and then held back by a full window
        would be older than it needs to be by the time it is sent."""
        end = time.monotonic() + (self.timeout if timeout_s is None else timeout_s)
        while any(p.full() for p in self.pending):
            if time.monotonic() > end:
                return False
            self.poll(timeout_s=min(0.05, self.timeout))
        return True

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
        if self.segments is not None:
            self.segments.close()
