"""The parameter-server role: one shard owns a contiguous slice of theta and its optimiser state
(AdaGrad's accumulator, or Adam's moments), in shared memory (ps/state.py).

Sockets: a ROUTER for requests (HELLO, PUSH_GRAD, GET_PARAMS, STATS) and a PUB for the parameter
broadcast (PARAMS every `broadcast_every` updates or `broadcast_interval_ms`, HEARTBEAT when idle).
The slice, the layout and the initial theta come from the run directory (layout.json, init.npy, written
when the run was prepared), so a shard never builds a model. The version (updates applied) is the
shard's clock; shard 0's is the global update count.

Every request is validated before it touches state; a bad one is counted by reason, logged once per
reason, and answered with an ERROR. A gradient is discarded as stale (answered STALE) when the theta it
was computed against is more than `ps.max_staleness` of the shard's updates old, or stopped being the
newest more than `ps.max_staleness_s` seconds ago, or more than `ps.staleness_factor` times the
median age of the latest gradients (each 0: off; docs/SCALING.md says which to use when). A gradient
computed against a version this shard never reached (it came back from an older state than the
client saw) is refused as AHEAD: the client re-snapshots. A gradient may come as float32, float16 or
bfloat16 (net.grad_dtype); it is applied in float32. From a learner on the same host
(net.shm_push=auto) it may instead name a slice of the learner's shared-memory buffer, read in place
(ps/local.py says what is checked first). A (client, seq) pair is applied at most once
(ps/state.py says how, with a bounded table): a retried push gets the first outcome back (counted as a
duplicate), across restarts too.

A shard restarted on the same host re-adopts its live shared-memory segment (theta, optimiser state,
dedup table, version): a SIGKILLed shard loses no applied update. Only when the segment is gone (a
lost host) or torn (killed mid-apply) does it resume from its checkpoint; an unreadable checkpoint
stops it with an error naming the file (`ps.bad_checkpoint=initial` starts over instead).
"""
from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time

import numpy as np
import zmq

from gorila_zmq import config as C
from gorila_zmq.fields import ConfigError
from gorila_zmq.host.files import remove_stale_temporaries
from gorila_zmq.net import protocol as P, security, topology
from gorila_zmq.ps import optim
from gorila_zmq.ps.local import SegmentReader, host_identity
from gorila_zmq.ps.layout import ParamLayout, load_init_slice, load_run_layout, load_run_token
from gorila_zmq.ps.state import ShardState, checkpoint_path, dedup_clients, load_checkpoint, save_checkpoint
from gorila_zmq.roles.base import Role, role_main

log = logging.getLogger("gorila_zmq.ps")

AGE_RING = 1 << 18      # updates whose application time a shard remembers (2 MB), for ps.max_staleness_s


def _bucket(staleness: int) -> int:
    """Histogram bucket of a staleness: itself up to 16, else the power of two at or above it."""
    if staleness <= 16:
        return staleness
    return 1 << (staleness - 1).bit_length()


def _bind_retrying(sock: zmq.Socket, endpoint: str, timeout_s: float = 3.0) -> None:
    """Bind, retrying briefly: a predecessor restarted in the same place may still hold the port."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() > end:
                raise
            time.sleep(0.1)


# -- the shard ----------------------------------------------------------------------------------

class ParameterServerShard(Role):
    def __init__(self, cfg: C.Config, index: int, ctx: zmq.Context | None = None,
                 layout: ParamLayout | None = None, init_theta: np.ndarray | None = None):
        """`layout` and `init_theta` (the whole initial vector) default to the run's recorded ones."""
        self.name = f"ps{index}"
        if not 0 <= index < cfg.ps.shards:
            raise ConfigError(f"shard index {index} out of range for ps.shards={cfg.ps.shards}")
        if layout is None:
            layout = load_run_layout(cfg.run.run_dir)
            if layout is None:
                raise ConfigError(f"{cfg.run.run_dir} has no layout.json: start the run with `gorila-zmq dev` "
                                  "(or cluster up), which prepares it")
        super().__init__(cfg, ctx, None, scalars=False)
        self.index = index
        self.layout = layout
        self.start, self.stop = layout.shard_ranges(cfg.ps.shards)[index]
        self.size = self.stop - self.start
        self.incarnation = random.getrandbits(32) or 1
        self.ckpt_path = checkpoint_path(cfg.run.run_dir, index)

        self.optimizer = optim.make_server_optimizer(cfg.ps)
        self._writer: threading.Thread | None = None       # the periodic checkpoint being written, if any
        self.state = ShardState(f"gz_{cfg.run_id}_ps{index}", self.size, self.optimizer.n_states,
                                dedup_clients(cfg), layout.hash, load_run_token(cfg.run.run_dir), adopt=True)
        remove_stale_temporaries(self.ckpt_path)             # left by a shard killed mid-write
        try:
            resumed = "segment" if self.state.adopted else "checkpoint" if self._restore() else None
        except BaseException:
            self.state.close()               # made just now: nothing to keep
            raise
        if self.state.adopted:
            log.info("shard %d: re-adopted the live shared memory at version %d (nothing applied is lost)",
                     index, self.state.version)
        elif self.state.refused:
            log.warning("shard %d: did not re-adopt the shared memory left behind (%s); %s", index,
                        self.state.refused, "resuming from the checkpoint" if resumed else "starting afresh")
        if not resumed:
            self.state.theta[:] = (init_theta[self.start:self.stop] if init_theta is not None
                                   else load_init_slice(cfg.run.run_dir, self.start, self.stop))
            self.optimizer.init_states(self.state.states)
            self.state.version = 0

        self.counters = {"updates_applied": 0, "discarded_stale": 0, "duplicates": 0, "bytes_in": 0, "bytes_out": 0,
                         "broadcasts": 0, "heartbeats": 0, "snapshots": 0, "checkpoints": 0,
                         "checkpoint_errors": 0, "checkpoint_write_s": 0.0,
                         "staleness": collections.Counter(),   # histogram: exact to 16, then powers of 2
                         "age_ms": collections.Counter(),      # the same, of the gradient's age in ms
                         "forgotten_retries": 0, "shm_pushes": 0, "resumed_from": resumed}
        self.rejections = P.Rejections(log, f"shard {index}")
        self.started = time.monotonic()
        self._wide = np.empty(self.size, np.float32)         # float16/bfloat16 gradients widened here
        # Same-host pushes (ps/local.py): the learner's segment is read in place.
        self.segments = SegmentReader(cfg.run_id) if cfg.net.shm_push != "off" else None
        self.host = host_identity() if self.segments is not None else ""    # in the HELLO reply
        # When each of the latest AGE_RING versions was reached; a resumed shard's past versions count
        # as reached now (a gradient computed before a restart is not old because of the restart).
        self._reached = np.full(AGE_RING, self.started, np.float64)
        self._ages = np.zeros(256, np.float64)                # the latest gradients' ages (staleness_factor)
        self._n_ages = 0
        self._age_median: float | None = None
        topology.ensure_ipc_dir(cfg)
        maxmsg = int(4 * self.size * cfg.ps.max_payload_factor) + 65536
        self.router = P.make_socket(self.ctx, zmq.ROUTER, maxmsgsize=maxmsg, rcvhwm=64, sndhwm=256)
        self.pub = P.make_socket(self.ctx, zmq.PUB, sndhwm=2)
        self._poller = zmq.Poller()                        # made once: step() polls on every turn
        self._poller.register(self.router, zmq.POLLIN)
        self.auth = [security.AuthMonitor(s) for s in (self.router, self.pub)] if security.current() else []
        self.router_ep = topology.ps_request(cfg, index)
        self.pub_ep = topology.ps_broadcast(cfg, index)
        try:
            _bind_retrying(self.router, self.router_ep.bind)
            _bind_retrying(self.pub, self.pub_ep.bind)
        except zmq.ZMQError as e:
            self.close()
            raise ConfigError(f"shard {index}: cannot bind {self.router_ep.bind} / {self.pub_ep.bind}: {e} "
                              "(is another shard or program using the port? see net.base_port)") from e
        self._bcast_seq = 0
        self._last_send = self._last_bcast_t = time.monotonic()
        self._last_bcast_version = self.state.version
        self._last_ckpt = time.monotonic()
        log.info("shard %d: params [%d, %d) of %d, version %d%s, router %s, pub %s", index, self.start,
                 self.stop, layout.size, self.state.version, " (resumed)" if resumed else "",
                 self.router_ep.bind, self.pub_ep.bind)

    # -- lifecycle ------------------------------------------------------------------------------
    def _restore(self) -> bool:
        try:
            ck = load_checkpoint(self.ckpt_path)
        except Exception as e:  # noqa: BLE001 - atomic writes make this rare, but a disk can fail
            if self.cfg.ps.bad_checkpoint != "initial":
                raise ConfigError(f"shard {self.index}: checkpoint {self.ckpt_path} is unreadable "
                                  f"({type(e).__name__}: {e}); refusing to start from the initial parameters "
                                  "and lose the run's progress. Restore the file, or pass ps.bad_checkpoint=initial "
                                  "to move it aside and start this shard over") from None
            aside = f"{self.ckpt_path}.corrupt-{int(time.time())}"
            os.replace(self.ckpt_path, aside)
            log.error("shard %d: checkpoint %s unreadable (%s): moved to %s; STARTING FROM THE INITIAL "
                      "PARAMETERS (ps.bad_checkpoint=initial)", self.index, self.ckpt_path, e, aside)
            return False
        if ck is None:
            return False
        theta, states, meta = ck
        if meta.get("layout_hash") != self.layout.hash or meta.get("start") != self.start \
                or meta.get("stop") != self.stop:
            raise RuntimeError(f"checkpoint {self.ckpt_path} is for another model or sharding "
                               f"(hash {meta.get('layout_hash')}, range {meta.get('start')}-{meta.get('stop')}); "
                               f"this shard is hash {self.layout.hash}, range {self.start}-{self.stop}")
        if meta.get("optimizer", "adagrad") != self.optimizer.name or len(states) != self.optimizer.n_states:
            raise RuntimeError(f"checkpoint {self.ckpt_path} holds {meta.get('optimizer', 'adagrad')} state; "
                               f"this shard runs ps.optimizer={self.optimizer.name}")
        self.state.theta[:] = theta
        for dst, src in zip(self.state.states, states):
            dst[:] = src
        self.state.version = int(meta["version"])
        if "dedup_rows" in meta:
            self.state.dedup.load(meta["dedup_rows"])
        return True

    def _checkpoint_meta(self) -> dict:
        return {"version": self.state.version, "layout_hash": self.layout.hash, "start": self.start,
                "optimizer": self.optimizer.name,
                "stop": self.stop, "shard": self.index, "time": time.time()}

    def checkpoint(self) -> None:
        """Write a checkpoint now, in this thread (after one being written in the background)."""
        if self._writer is not None:
            self._writer.join()
        t0 = time.monotonic()
        save_checkpoint(self.ckpt_path, self.state.theta, self.state.states, self._checkpoint_meta(),
                        self.state.dedup.rows)
        self.counters["checkpoints"] += 1
        self.counters["checkpoint_write_s"] = time.monotonic() - t0
        self._last_ckpt = time.monotonic()

    def checkpoint_in_background(self) -> bool:
        """The serving loop's periodic checkpoint: theta, the optimiser state and the dedup table are
        copied here (one memcpy, consistent with each other), then written and fsynced by a thread, so
        a large shard (87 MB for DrQ-v2) keeps answering pushes meanwhile. False (nothing started)
        while the previous one is still being written. A failed write is logged and counted; the
        previous checkpoint stays intact (save_checkpoint is atomic) and the shard serves on."""
        if self._writer is not None and self._writer.is_alive():
            return False
        meta = self._checkpoint_meta()
        theta, states = self.state.theta.copy(), [s.copy() for s in self.state.states]
        dedup = self.state.dedup.rows.copy()
        self._last_ckpt = time.monotonic()

        def write():
            t0 = time.monotonic()
            try:
                save_checkpoint(self.ckpt_path, theta, states, meta, dedup)
            except Exception as e:  # noqa: BLE001 - a full disk must not take the shard down
                self.counters["checkpoint_errors"] += 1
                log.error("shard %d: checkpoint at version %d failed (%s: %s); the previous one is intact",
                          self.index, meta["version"], type(e).__name__, e)
                return
            self.counters["checkpoints"] += 1
            self.counters["checkpoint_write_s"] = time.monotonic() - t0
        self._writer = threading.Thread(target=write, name=f"ps{self.index}-checkpoint", daemon=True)
        self._writer.start()
        return True

    def close(self) -> None:
        for m in getattr(self, "auth", []):
            m.close()
        self.auth = []
        if getattr(self, "segments", None) is not None:
            self.segments.close()
        for attr in ("router", "pub"):
            if getattr(self, attr, None) is not None:
                getattr(self, attr).close(linger=0)
                setattr(self, attr, None)
        if getattr(self, "state", None) is not None:
            if self._writer is not None:
                self._writer.join()          # a background checkpoint still reads its own copy, not state
            # A shard that stopped on an error leaves its (consistent) segment for its successor.
            self.state.close(unlink=not self.failed)
            self.state = None
        super().close()

    # -- main loop ------------------------------------------------------------------------------
    def step(self) -> None:
        """Serve what is queued (waiting at most until the next broadcast or heartbeat is due), but
        never starve the broadcast/heartbeat timers; then the periodic checkpoint."""
        if self._poller.poll(self._poll_timeout_ms()):
            for _ in range(64):
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.handle(frames)
                if self._broadcast_due():
                    self.broadcast()
        now = time.monotonic()
        if self._broadcast_due():
            self.broadcast()
        elif now - self._last_send >= self.cfg.net.heartbeat_interval_s:
            self.heartbeat()
        for m in self.auth:
            m.poll()
        interval = self.cfg.ps.checkpoint_interval_s
        if interval > 0 and now - self._last_ckpt >= interval:
            self.checkpoint_in_background()

    def finish(self) -> None:
        self.checkpoint()
        log.info("shard %d: stopped at version %d, %s", self.index, self.state.version, self.stats())

    def _poll_timeout_ms(self) -> int:
        wait = self.cfg.net.heartbeat_interval_s - (time.monotonic() - self._last_send)
        if self.state.version != self._last_bcast_version:
            wait = min(wait, max(self.cfg.ps.broadcast_interval_ms, self.cfg.ps.broadcast_min_interval_ms) / 1000.0)
        return max(1, min(1000, int(wait * 1000)))

    def _broadcast_due(self) -> bool:
        pending = self.state.version - self._last_bcast_version
        if pending <= 0:
            return False
        gap = self.cfg.ps.broadcast_min_interval_ms
        if gap and (time.monotonic() - self._last_bcast_t) * 1000.0 < gap:
            return False                    # a rate cap: the fan-out's bytes stay bounded at any update rate
        return (pending >= self.cfg.ps.broadcast_every or
                (time.monotonic() - self._last_send) * 1000.0 >= self.cfg.ps.broadcast_interval_ms)

    # -- outgoing -------------------------------------------------------------------------------
    def _hdr(self, cmd, **kw) -> P.Header:
        return P.Header(cmd, shard=self.index, incarnation=self.incarnation, pversion=self.state.version,
                        layout=self.layout.hash, **kw)

    def broadcast(self) -> None:
        self._bcast_seq += 1
        # A copy: the PUB socket sends from its buffer in the I/O thread while theta keeps changing.
        frames = P.message(self._hdr(P.Cmd.PARAMS, seq=self._bcast_seq), self.state.theta.copy())
        self.pub.send_multipart(frames, copy=False)
        self.counters["broadcasts"] += 1
        self.counters["bytes_out"] += 4 * self.size
        self._last_bcast_version = self.state.version
        self._last_send = self._last_bcast_t = time.monotonic()

    def heartbeat(self) -> None:
        self.pub.send_multipart(P.message(self._hdr(P.Cmd.HEARTBEAT, seq=self._bcast_seq)))
        self.counters["heartbeats"] += 1
        self._last_send = time.monotonic()

    def _reply(self, ident: bytes, hdr: P.Header, payload=None) -> None:
        frames = [ident] + P.message(hdr, payload)
        try:
            self.router.send_multipart(frames, copy=payload is None or not isinstance(payload, np.ndarray),
                                       flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # peer gone or its queue full: it will retry
        if isinstance(payload, np.ndarray):
            self.counters["bytes_out"] += payload.nbytes

    def _reject(self, ident: bytes, req: P.Header | None, error: Exception) -> None:
        hdr, body = self.rejections.reject(req, error, shard=self.index, incarnation=self.incarnation,
                                           pversion=self.state.version)
        hdr.layout = self.layout.hash
        self._reply(ident, hdr, body)

    # -- incoming -------------------------------------------------------------------------------
    def handle(self, frames: list) -> None:
        """Validate one ROUTER message and act on it. Never raises for anything a peer can send."""
        ident = frames[0].bytes
        body = frames[1:]
        self.counters["bytes_in"] += sum(len(f) for f in frames)
        req = None
        try:
            req, payload = P.parse(body)
            if req.shard != self.index:
                raise P.ProtocolError(P.Status.BAD_SHARD, f"request for shard {req.shard} reached shard {self.index}")
            if req.command == P.Cmd.HELLO:
                return self._hello(ident, req, payload)
            if req.layout != self.layout.hash:
                raise P.ProtocolError(P.Status.BAD_LAYOUT, f"layout hash {req.layout:016x} != this shard's "
                                      f"{self.layout.hash:016x}: the client runs another model")
            if req.command == P.Cmd.PUSH_GRAD:
                return self._push(ident, req, payload)
            if req.command == P.Cmd.GET_PARAMS:
                self.counters["snapshots"] += 1
                return self._reply(ident, self._hdr(P.Cmd.PARAMS, seq=req.seq, client=req.client),
                                   self.state.theta.copy())
            if req.command == P.Cmd.STATS:
                return self._reply(ident, self._hdr(P.Cmd.REPLY, seq=req.seq, client=req.client), self.stats())
            raise P.ProtocolError(P.Status.BAD_COMMAND, f"command {P.Cmd(req.command).name} is not served by a shard")
        except Exception as e:  # noqa: BLE001 - nothing a peer sends may take the shard down
            self._reject(ident, req, e)

    HELLO_FIELDS = {"layout_hash": P.Field(int, 0, (1 << 64) - 1, None), "n_params": P.Field(int, 0, 1 << 48, None)}

    def _hello(self, ident, req, payload) -> None:
        info = P.fields(P.as_json(req, payload), self.HELLO_FIELDS, "HELLO") if payload is not None else {}
        want = req.layout if info.get("layout_hash") is None else info["layout_hash"]
        if want != self.layout.hash:
            n = info.get("n_params")
            raise P.ProtocolError(P.Status.BAD_LAYOUT,
                                  f"client layout hash {want:016x} ({'?' if n is None else n} params) != shard's "
                                  f"{self.layout.hash:016x} ({self.layout.size} params): different models")
        self._reply(ident, self._hdr(P.Cmd.REPLY, seq=req.seq, client=req.client), self.describe())

    def _push(self, ident, req, payload) -> None:
        first = self.state.dedup.lookup(req.client, req.seq, bool(req.flags & P.FLAG_RETRY))
        if first == P.Status.FORGOTTEN:
            self.counters["forgotten_retries"] += 1
            raise P.ProtocolError(P.Status.FORGOTTEN, f"push {req.seq} of client {req.client} is a retry this "
                                  "shard can no longer match to its first outcome: not applied (at most once)")
        if first is not None:
            self.counters["duplicates"] += 1
            return self._reply(ident, self._hdr(P.Cmd.REPLY, seq=req.seq, client=req.client, status=first))
        if req.dtype == P.Dtype.SHM_REF:
            if self.segments is None:
                raise P.ProtocolError(P.Status.BAD_DTYPE, "this shard takes no shared-memory pushes (net.shm_push=off)")
            grad = self.segments.view(req, payload, self.size)
            self.counters["shm_pushes"] += 1
        else:
            grad = P.widen_floats(req, payload, self.size, self._wide)
        version = self.state.version
        staleness = version - req.pversion
        if staleness < 0:
            raise P.ProtocolError(P.Status.AHEAD, f"gradient computed against version {req.pversion}, but this "
                                  f"shard is at {version} (it came back from an older state): re-snapshot")
        age_s = self._age_s(req.pversion)
        self.counters["staleness"][_bucket(staleness)] += 1
        self.counters["age_ms"][_bucket(int(min(age_s, 1e6) * 1000.0))] += 1
        bound, bound_s = self.cfg.ps.max_staleness, self._age_bound()
        self._note_age(age_s)
        stale = bool((bound and staleness > bound) or (bound_s and age_s > bound_s))
        if not stale and not optim.all_finite(grad):
            raise P.ProtocolError(P.Status.NON_FINITE, "gradient contains NaN or Inf")
        self.state.begin()                  # theta, states, dedup and version change together
        if stale:
            self.counters["discarded_stale"] += 1
            status = P.Status.STALE
        else:
            self.optimizer.apply(self.state.theta, self.state.states, grad, version)
            status = P.Status.APPLIED
        self.state.dedup.record(req.client, req.seq, not stale)
        if not stale:
            self.state.version = version + 1
            self._reached[(version + 1) % AGE_RING] = time.monotonic()
            self.counters["updates_applied"] += 1
        self.state.end()
        self._reply(ident, self._hdr(P.Cmd.REPLY, seq=req.seq, client=req.client, status=status))

    def _age_bound(self) -> float:
        """The age bound now: ps.max_staleness_s, or ps.staleness_factor x the median age of the latest
        256 gradients if that is larger (0: no age bound). The median is what an honest gradient waits
        in this layout, so the bound grows with the learners; a learner that stalled for many of its
        peers' cycles is still refused."""
        bound = self.cfg.ps.max_staleness_s
        if self.cfg.ps.staleness_factor and self._age_median is not None:
            bound = max(bound, self.cfg.ps.staleness_factor * self._age_median)
        return bound

    def _note_age(self, age_s: float) -> None:
        if not self.cfg.ps.staleness_factor:
            return
        self._ages[self._n_ages % len(self._ages)] = min(age_s, 1e6)
        self._n_ages += 1
        if self._n_ages >= 64 and self._n_ages % 16 == 0:
            self._age_median = float(np.median(self._ages[:min(self._n_ages, len(self._ages))]))

    def _age_s(self, pversion: int) -> float:
        """How long ago theta at `pversion` stopped being the newest: 0 for the current version, the
        time since update pversion+1 was applied otherwise (the shard's own clock, so hosts need no
        synchronised clocks). Older than the ring remembers: infinitely old."""
        behind = self.state.version - pversion
        if behind <= 0:
            return 0.0
        if behind >= AGE_RING:
            return float("inf")
        return time.monotonic() - float(self._reached[(pversion + 1) % AGE_RING])

    # -- introspection --------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"shard": self.index, "shards": self.cfg.ps.shards, "start": self.start, "stop": self.stop,
                "n_params": self.layout.size, "layout_hash": self.layout.hash, "version": self.state.version,
                "incarnation": self.incarnation, "max_staleness": self.cfg.ps.max_staleness,
                "max_staleness_s": self.cfg.ps.max_staleness_s, "age_bound_s": self._age_bound(),
                "pub": self.pub_ep.connect, "host": self.host}

    def stats(self) -> dict:
        d = dict(self.counters, **self.rejections.as_dict())
        for k in ("staleness", "age_ms"):
            d[k] = {str(b): v for b, v in sorted(self.counters[k].items())}
        d["curve"] = bool(self.auth)
        d["auth_failures"] = sum(m.poll() for m in self.auth)
        d.update(role="ps", shard=self.index, version=self.state.version if self.state else None,
                 incarnation=self.incarnation, uptime_s=round(time.monotonic() - self.started, 3), pid=os.getpid())
        return d


# -- entry point --------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    return role_main(argv, "ps", "Run one parameter-server shard.", lambda cfg, i: ParameterServerShard(cfg, i),
                     uses_torch=False)
