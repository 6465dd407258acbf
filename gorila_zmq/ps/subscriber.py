"""The parameter subscriber (zguide Clone agent): a background thread that subscribes to every shard's
PUB first, then takes a snapshot of each, then applies only newer broadcasts. `latest()` never blocks
on the network. A shard silent for `heartbeat_liveness` intervals is marked dead; the thread
reconnects with backoff 1 -> 32 s and re-snapshots when the shard is back (a new incarnation always
means a re-snapshot: a restarted shard's version may go backwards)."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import zmq

from gorila_zmq.net import protocol as P
from gorila_zmq.net.rpc import Unavailable, request
from gorila_zmq.ps.client import ShardSet

log = logging.getLogger("gorila_zmq.client")

class ParamSubscriber:
    """Background thread keeping the latest complete theta. Thread-safe readers: latest(), versions."""

    def __init__(self, ctx: zmq.Context, shards: ShardSet, socket_options=None, hwm: int | None = None,
                 record_latency: bool = False, store=None):
        """`store` (ps/shared.py's SharedParamsWriter): every slice goes there instead of into a theta
        of this object's own (the relay; latest() is then not available)."""
        self.ctx, self.shards = ctx, shards
        net = shards.cfg.net
        self.hb_interval, self.liveness = net.heartbeat_interval_s, net.heartbeat_liveness
        self.backoff_max, self.timeout = net.reconnect_max_s, net.request_timeout_s
        self.hwm = hwm if hwm is not None else net.sub_hwm
        self._socket_options = socket_options
        n = shards.n
        self.store = store
        self._theta = np.zeros(shards.layout.size if store is None else 0, np.float32)
        self._lock = threading.Lock()
        self.versions = [-1] * n            # -1: no snapshot yet
        self.incarnations = [0] * n
        self.alive = [False] * n
        self.last_seen = [0.0] * n
        self.updates = 0                    # increments whenever any slice changes
        self.counters = {"broadcasts": 0, "applied": 0, "ignored_old": 0, "snapshots": 0, "gaps": 0,
                         "reconnects": 0, "malformed": 0, "dead_events": 0}
        self.latency_ns: list[int] = []     # broadcast delivery latencies (same-host clocks)
        self.record_latency = record_latency
        self._bseq = [0] * n
        self._said: set = set()
        self.error: str | None = None       # the last unexpected error of the thread (it carries on)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._resnap: set[int] = set()      # shards a reader asked to re-snapshot (resnapshot())
        self._thread = threading.Thread(target=self._run, name="param-subscriber", daemon=True)
        self._thread.start()

    # -- readers --------------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        return self._ready.wait(timeout_s)

    def resnapshot(self, i: int) -> None:
        """Take a fresh snapshot of shard i soon (its broadcasts alone would not correct a version it
        never reached: a shard refused a push as AHEAD)."""
        with self._lock:
            self._resnap.add(i)

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
        self._store(i, a, b, arr, rhdr.pversion, rhdr.incarnation)
        self.counters["snapshots"] += 1
        self.alive[i], self.last_seen[i] = True, time.monotonic()
        if all(v >= 0 for v in self.versions):
            self._ready.set()
        return True

    def _store(self, i: int, a: int, b: int, arr: np.ndarray, version: int, incarnation: int) -> None:
        if self.store is not None:
            self.store.write(i, arr, version, incarnation)
            with self._lock:
                self.versions[i], self.incarnations[i] = version, incarnation
                self.updates += 1
            return
        with self._lock:
            self._theta[a:b] = arr
            self.versions[i], self.incarnations[i] = version, incarnation
            self.updates += 1

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
        if self._resnap:
            with self._lock:
                asked, self._resnap = self._resnap, set()
            for i in asked:
                need_snapshot[i], next_try[i] = True, 0.0
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
        if self.store is not None:
            self.store.set_alive(self.alive)
            self.store.beat()
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
        self._store(i, a, b, arr, hdr.pversion, hdr.incarnation)
        self.counters["applied"] += 1
        return False
