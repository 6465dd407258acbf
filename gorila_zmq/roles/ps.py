"""One parameter-server shard: owns a contiguous slice of theta and its optimiser state (AdaGrad's
accumulator, or Adam's moments).

Sockets: a ROUTER for requests (HELLO, PUSH_GRAD, GET_PARAMS, STATS) and a PUB for the parameter
broadcast (PARAMS every `broadcast_every` updates or `broadcast_interval_ms`, HEARTBEAT when idle).
theta and the optimiser state live in one shared-memory segment `gz_<run>_ps<i>`
([header | theta | state 0 | state 1 ...]), released on shutdown. The version (updates applied) is the shard's clock; shard 0's is the global update count.

Every request is validated before it touches state; a bad one is counted by reason, logged once per
reason, and answered with an ERROR. A (client, seq) pair is applied at most once: a retried push gets
the first outcome back (counted as a duplicate) and is not applied again, across restarts too (the table is saved
with the checkpoint).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import logging
import os
import random
import signal
import threading
import time

import numpy as np
import zmq

from gorila_zmq import config as C
from gorila_zmq.ps import optim
from gorila_zmq.net import protocol as P
from gorila_zmq.net import security
from gorila_zmq.host import shm
from gorila_zmq.net import topology
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.agents.dqn.networks import build_model

log = logging.getLogger("gorila_zmq.roles.ps")

SHM_HEADER = 64          # bytes before theta in the segment: magic, version, size
DEDUP_PER_CLIENT = 1024  # remembered (seq -> outcome) per client
DEDUP_CLIENTS = 256      # clients remembered (least recently seen forgotten first)


class ShardState:
    """theta and the optimiser's state arrays for one shard, as views of a shared-memory segment."""

    def __init__(self, name: str, size: int, n_states: int = 1):
        self.name = name
        self.seg = shm.create(name, SHM_HEADER + 4 * size * (1 + n_states))
        self.meta = np.ndarray((8,), np.int64, self.seg.buf, 0)   # [magic, version, size, n_states ...]
        self.theta = np.ndarray((size,), np.float32, self.seg.buf, SHM_HEADER)
        self.states = [np.ndarray((size,), np.float32, self.seg.buf, SHM_HEADER + 4 * size * (1 + k))
                       for k in range(n_states)]
        self.meta[:] = 0
        self.meta[0], self.meta[2], self.meta[3] = 0x475A5053, size, n_states

    @property
    def accum(self) -> np.ndarray:
        """AdaGrad's accumulator G (the first state array)."""
        return self.states[0]

    @property
    def version(self) -> int:
        return int(self.meta[1])

    @version.setter
    def version(self, v: int) -> None:
        self.meta[1] = v

    def close(self) -> None:
        self.meta = self.theta = None
        self.states = []
        shm.release(self.seg, unlink=True)


# -- checkpoints --------------------------------------------------------------------------------

def checkpoint_path(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, "ckpt", f"ps{index}.npz")


def save_checkpoint(path: str, theta: np.ndarray, states, meta: dict) -> None:
    """Atomic: write a temporary file, fsync it, rename over the old one, fsync the directory.
    A crash at any point leaves the previous checkpoint (or none) intact and loadable."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            states = [states] if isinstance(states, np.ndarray) else list(states)
            np.savez(f, theta=theta, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                     **{f"state{k}": s for k, s in enumerate(states)})
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:                                # a full disk must not also keep a partial file
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.replace(tmp, path)
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_checkpoint(path: str) -> tuple[np.ndarray, list[np.ndarray], dict] | None:
    """(theta, [state arrays], meta), or None when there is no checkpoint."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        n = sum(1 for k in z.files if k.startswith("state"))
        return z["theta"].astype(np.float32), [z[f"state{k}"].astype(np.float32) for k in range(n)], meta


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

class ParameterServerShard:
    def __init__(self, cfg: C.Config, index: int, ctx: zmq.Context | None = None,
                 layout: ParamLayout | None = None, init_theta: np.ndarray | None = None):
        self.cfg, self.index = cfg, index
        if layout is None or init_theta is None:
            if cfg.model.kind == "auto":
                from gorila_zmq.envs import resolve_model
                resolve_model(cfg)
            model = build_model(cfg.model, cfg.run.seed)
            layout = ParamLayout.from_module(model)
            init_theta = layout.flatten(model)
        if not 0 <= index < cfg.ps.shards:
            raise ValueError(f"shard index {index} out of range for ps.shards={cfg.ps.shards}")
        self.layout = layout
        self.start, self.stop = layout.shard_ranges(cfg.ps.shards)[index]
        self.size = self.stop - self.start
        self.incarnation = random.getrandbits(32) or 1
        self.ckpt_path = checkpoint_path(cfg.run.run_dir, index)

        self.optimizer = optim.make_server_optimizer(cfg.ps)
        self.state = ShardState(f"gz_{cfg.run_id}_ps{index}", self.size, self.optimizer.n_states)
        self.dedup: collections.OrderedDict[int, collections.OrderedDict] = collections.OrderedDict()
        for stale_tmp in glob.glob(self.ckpt_path + ".tmp-*"):   # left by a shard killed mid-write
            os.unlink(stale_tmp)
        resumed = self._restore()
        if not resumed:
            self.state.theta[:] = init_theta[self.start:self.stop]
            self.optimizer.init_states(self.state.states)
            self.state.version = 0

        self.stats = {"updates_applied": 0, "discarded_stale": 0, "duplicates": 0,
                      "rejected": collections.Counter(), "bytes_in": 0, "bytes_out": 0,
                      "broadcasts": 0, "heartbeats": 0, "snapshots": 0, "checkpoints": 0,
                      "checkpoint_errors": 0, "checkpoint_write_s": 0.0,
                      "staleness": collections.Counter(),   # histogram: exact to 16, then powers of 2
                      "resumed_from_checkpoint": resumed}
        self._logged_kinds: set[str] = set()
        self.started = time.monotonic()

        self.ctx = ctx or zmq.Context.instance()
        topology.ensure_ipc_dir(cfg)
        maxmsg = int(4 * self.size * cfg.ps.max_payload_factor) + 65536
        self.router = P.make_socket(self.ctx, zmq.ROUTER, maxmsgsize=maxmsg, rcvhwm=64, sndhwm=256)
        self.pub = P.make_socket(self.ctx, zmq.PUB, sndhwm=2)
        self.auth = [security.AuthMonitor(s) for s in (self.router, self.pub)] if security.current() else []
        self.router_ep = topology.ps_request(cfg, index)
        self.pub_ep = topology.ps_broadcast(cfg, index)
        try:
            _bind_retrying(self.router, self.router_ep.bind)
            _bind_retrying(self.pub, self.pub_ep.bind)
        except zmq.ZMQError as e:
            self.close()
            raise RuntimeError(f"shard {index}: cannot bind {self.router_ep.bind} / {self.pub_ep.bind}: {e} "
                               "(is another shard or program using the port? see net.base_port)") from e
        self._stop = False
        self._bcast_seq = 0
        self._last_send = time.monotonic()
        self._last_bcast_version = self.state.version
        self._last_ckpt = time.monotonic()
        self._writer: threading.Thread | None = None       # the periodic checkpoint being written, if any
        log.info("shard %d: params [%d, %d) of %d, version %d%s, router %s, pub %s", index, self.start,
                 self.stop, layout.size, self.state.version, " (resumed)" if resumed else "",
                 self.router_ep.bind, self.pub_ep.bind)

    # -- lifecycle ------------------------------------------------------------------------------
    def _restore(self) -> bool:
        try:
            ck = load_checkpoint(self.ckpt_path)
        except Exception as e:  # cannot happen with atomic writes, but a disk can fail: keep the evidence
            aside = f"{self.ckpt_path}.corrupt-{int(time.time())}"
            os.replace(self.ckpt_path, aside)
            log.error("shard %d: checkpoint %s unreadable (%s): moved to %s; STARTING FROM THE INITIAL "
                      "PARAMETERS", self.index, self.ckpt_path, e, aside)
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
        for client, seqs in meta.get("dedup", {}).items():
            self.dedup[int(client)] = collections.OrderedDict((int(s), tuple(o)) for s, o in seqs)
        return True

    def _checkpoint_meta(self) -> dict:
        return {"version": self.state.version, "layout_hash": self.layout.hash, "start": self.start,
                "optimizer": self.optimizer.name,
                "stop": self.stop, "shard": self.index, "time": time.time(),
                "dedup": {str(c): list(d.items()) for c, d in self.dedup.items()}}

    def checkpoint(self) -> None:
        """Write a checkpoint now, in this thread (after one being written in the background)."""
        if self._writer is not None:
            self._writer.join()
        t0 = time.monotonic()
        save_checkpoint(self.ckpt_path, self.state.theta, self.state.states, self._checkpoint_meta())
        self.stats["checkpoints"] += 1
        self.stats["checkpoint_write_s"] = time.monotonic() - t0
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
        self._last_ckpt = time.monotonic()

        def write():
            t0 = time.monotonic()
            try:
                save_checkpoint(self.ckpt_path, theta, states, meta)
            except Exception as e:  # noqa: BLE001 - a full disk must not take the shard down
                self.stats["checkpoint_errors"] += 1
                log.error("shard %d: checkpoint at version %d failed (%s: %s); the previous one is intact",
                          self.index, meta["version"], type(e).__name__, e)
                return
            self.stats["checkpoints"] += 1
            self.stats["checkpoint_write_s"] = time.monotonic() - t0
        self._writer = threading.Thread(target=write, name=f"ps{self.index}-checkpoint", daemon=True)
        self._writer.start()
        return True

    def request_stop(self, *_):
        self._stop = True

    def close(self) -> None:
        for m in getattr(self, "auth", []):
            m.close()
        for s in (getattr(self, "router", None), getattr(self, "pub", None)):
            if s is not None:
                s.close(linger=0)
        if getattr(self, "state", None) is not None:
            self.state.close()
            self.state = None

    # -- main loop ------------------------------------------------------------------------------
    def serve(self, duration: float | None = None) -> None:
        """Serve until request_stop() (SIGTERM/SIGINT in the CLI) or `duration` seconds pass."""
        end = None if duration is None else time.monotonic() + duration
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        pcfg = self.cfg.ps
        try:
            while not self._stop and (end is None or time.monotonic() < end):
                if poller.poll(self._poll_timeout_ms()):
                    # Drain what is queued, but never starve the broadcast/heartbeat timers.
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
                if pcfg.checkpoint_interval_s > 0 and now - self._last_ckpt >= pcfg.checkpoint_interval_s:
                    self.checkpoint_in_background()
        finally:
            self.checkpoint()
            log.info("shard %d: stopped at version %d, %s", self.index, self.state.version, self.stats_dict())

    def _poll_timeout_ms(self) -> int:
        wait = self.cfg.net.heartbeat_interval_s - (time.monotonic() - self._last_send)
        if self.state.version != self._last_bcast_version:
            wait = min(wait, self.cfg.ps.broadcast_interval_ms / 1000.0)
        return max(1, min(1000, int(wait * 1000)))

    def _broadcast_due(self) -> bool:
        pending = self.state.version - self._last_bcast_version
        if pending <= 0:
            return False
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
        self.stats["broadcasts"] += 1
        self.stats["bytes_out"] += 4 * self.size
        self._last_bcast_version = self.state.version
        self._last_send = time.monotonic()

    def heartbeat(self) -> None:
        self.pub.send_multipart(P.message(self._hdr(P.Cmd.HEARTBEAT, seq=self._bcast_seq)))
        self.stats["heartbeats"] += 1
        self._last_send = time.monotonic()

    def _reply(self, ident: bytes, hdr: P.Header, payload=None) -> None:
        frames = [ident] + P.message(hdr, payload)
        try:
            self.router.send_multipart(frames, copy=payload is None or not isinstance(payload, np.ndarray),
                                       flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # peer gone or its queue full: it will retry
        if isinstance(payload, np.ndarray):
            self.stats["bytes_out"] += payload.nbytes

    def _reject(self, ident: bytes, req: P.Header | None, status: P.Status, detail: str) -> None:
        kind = P.Status(status).name
        self.stats["rejected"][kind] += 1
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            log.warning("shard %d: rejected a request (%s): %s (logged once per kind)", self.index, kind, detail)
        hdr, body = P.error_reply(req, status, detail, self.index, self.incarnation, self.state.version)
        hdr.layout = self.layout.hash
        self._reply(ident, hdr, body)

    # -- incoming -------------------------------------------------------------------------------
    def handle(self, frames: list) -> None:
        """Validate one ROUTER message and act on it. Never raises for anything a peer can send."""
        ident = frames[0].bytes
        body = frames[1:]
        self.stats["bytes_in"] += sum(len(f) for f in frames)
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
                self.stats["snapshots"] += 1
                return self._reply(ident, self._hdr(P.Cmd.PARAMS, seq=req.seq, client=req.client),
                                   self.state.theta.copy())
            if req.command == P.Cmd.STATS:
                return self._reply(ident, self._hdr(P.Cmd.REPLY, seq=req.seq, client=req.client), self.stats_dict())
            raise P.ProtocolError(P.Status.BAD_COMMAND, f"command {P.Cmd(req.command).name} is not served by a shard")
        except P.ProtocolError as e:
            self._reject(ident, req, e.status, e.detail)
        except Exception as e:  # a bug must not take the shard down; count it and keep serving
            log.exception("shard %d: internal error handling a request", self.index)
            self._reject(ident, req, P.Status.REJECTED, f"internal error: {type(e).__name__}")

    def _hello(self, ident, req, payload) -> None:
        info = P.as_json(req, payload) if payload is not None else {}
        want = info.get("layout_hash", req.layout)
        if type(want) is not int:
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, "HELLO's layout_hash must be an integer")
        if want != self.layout.hash:
            raise P.ProtocolError(P.Status.BAD_LAYOUT,
                                  f"client layout hash {want:016x} ({info.get('n_params', '?')} params) != shard's "
                                  f"{self.layout.hash:016x} ({self.layout.size} params): different models")
        self._reply(ident, self._hdr(P.Cmd.REPLY, seq=req.seq, client=req.client), self.describe())

    def _push(self, ident, req, payload) -> None:
        seen = self.dedup.get(req.client)
        if seen is not None:
            self.dedup.move_to_end(req.client)
        if seen is not None and req.seq in seen:
            self.stats["duplicates"] += 1
            status, version = seen[req.seq]
            return self._reply(ident, self._hdr(P.Cmd.REPLY, seq=req.seq, client=req.client, status=status))
        grad = P.as_array(req, payload, P.Dtype.FLOAT32, self.size)
        version = self.state.version
        staleness = version - req.pversion
        self.stats["staleness"][_bucket(staleness)] += 1
        if staleness > self.cfg.ps.max_staleness:
            self.stats["discarded_stale"] += 1
            status = P.Status.STALE
        elif not optim.all_finite(grad):
            raise P.ProtocolError(P.Status.NON_FINITE, "gradient contains NaN or Inf")
        else:
            self.optimizer.apply(self.state.theta, self.state.states, grad, version)
            self.state.version = version + 1
            self.stats["updates_applied"] += 1
            status = P.Status.APPLIED
        if seen is None:
            seen = self.dedup[req.client] = collections.OrderedDict()
            if len(self.dedup) > DEDUP_CLIENTS:
                self.dedup.popitem(last=False)
        seen[req.seq] = (int(status), self.state.version)
        if len(seen) > DEDUP_PER_CLIENT:
            seen.popitem(last=False)
        self._reply(ident, self._hdr(P.Cmd.REPLY, seq=req.seq, client=req.client, status=status))

    # -- introspection --------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"shard": self.index, "shards": self.cfg.ps.shards, "start": self.start, "stop": self.stop,
                "n_params": self.layout.size, "layout_hash": self.layout.hash, "version": self.state.version,
                "incarnation": self.incarnation, "max_staleness": self.cfg.ps.max_staleness,
                "pub": self.pub_ep.connect}

    def stats_dict(self) -> dict:
        d = dict(self.stats)
        d["rejected"] = dict(self.stats["rejected"])
        d["staleness"] = {str(k): v for k, v in sorted(self.stats["staleness"].items())}
        d["curve"] = bool(self.auth)
        d["auth_failures"] = sum(m.poll() for m in self.auth)
        d["rejected_total"] = sum(self.stats["rejected"].values())
        d.update(role="ps", shard=self.index, version=self.state.version if self.state else None,
                 incarnation=self.incarnation, uptime_s=round(time.monotonic() - self.started, 3), pid=os.getpid())
        return d


# -- entry point --------------------------------------------------------------------------------

def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.add_argument("--log-level", default=os.environ.get("GORILA_LOG", "INFO"))


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s {role} %(levelname)s %(message)s")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gorila-zmq ps", description="Run one parameter-server shard.")
    p.add_argument("--index", type=int, required=True, help="which shard (0 .. ps.shards-1)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    add_common_args(p)
    a = p.parse_args(argv)
    setup_logging(a.log_level, f"ps{a.index}")
    cfg = C.load(a.config, a.overrides)
    os.makedirs(cfg.run.run_dir, exist_ok=True)
    security.configure_role(cfg, f"ps{a.index}")
    shard = ParameterServerShard(cfg, a.index)
    signal.signal(signal.SIGTERM, shard.request_stop)
    signal.signal(signal.SIGINT, shard.request_stop)
    try:
        shard.serve(a.duration)
    finally:
        shard.close()
    return 0
