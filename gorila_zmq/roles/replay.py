"""Global replay (Gorila's "global replay database"): sharded replay servers that many actors write to
and many learners sample from, over ZeroMQ.

- `ReplayServer` (role `replay`): a ROUTER in front of a ReplayMemory. REPLAY_ADD carries a batch of
  packed transition records from one actor; REPLAY_SAMPLE (JSON {"batch": B}) returns one packed
  batch; STATS returns JSON. Memory is bounded by the ring; a full inbound queue (ROUTER high-water
  mark) and each client's bounded window are the backpressure. Nothing is unpickled: records are a
  fixed little-endian numpy structured dtype, validated before anything touches the memory.
- `ReplayWriter` (in an actor): buffers records, sends a batch every `FLUSH_RECORDS` or 50 ms, at
  most `net.in_flight` batches unanswered (an actor faster than its replay shard waits).
- `RemoteSource` (in a learner): requests batches from the shards in turn.

Actor j writes to shard j % R, in lanes (j // R) * E .. + E - 1 (E = env.num_envs).
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import zmq

from gorila_zmq.net import protocol as P
from gorila_zmq.net import topology
from gorila_zmq.ps.client import new_client_id
from gorila_zmq.roles.base import Role, role_main

log = logging.getLogger("gorila_zmq.roles.replay")

START, ADD = 0, 1
MAX_SAMPLE = 4096


def record_dtype(spec) -> np.dtype:
    return np.dtype([("kind", "u1"), ("terminated", "u1"), ("truncated", "u1"), ("_pad", "u1"),
                     ("lane", "<u4"), ("reward", "<f4"),
                     ("action", spec.action_dtype.newbyteorder("<"), spec.action_shape),
                     ("frame", spec.dtype.newbyteorder("<"), tuple(spec.frame_shape))])


def batch_layout(spec, B: int) -> list[tuple[str, np.dtype, tuple]]:
    obs = (spec.stack, *spec.frame_shape) if spec.stack > 1 else tuple(spec.frame_shape)
    return [("obs", spec.dtype, (B, *obs)), ("next_obs", spec.dtype, (B, *obs)),
            ("action", spec.action_dtype.newbyteorder("<"), (B, *spec.action_shape)),
            ("reward", np.dtype("<f4"), (B,)), ("discount", np.dtype("<f4"), (B,))]


def batch_nbytes(spec, B: int) -> int:
    return sum(np.dtype(d).itemsize * math.prod(s) for _, d, s in batch_layout(spec, B))


def actors_per_shard(cfg) -> int:
    return -(-cfg.roles.actors // cfg.roles.replay_shards)


class ReplayServer(Role):
    def __init__(self, cfg, index: int, ctx=None):
        self.name = f"replay{index}"
        super().__init__(cfg, ctx, None)
        from gorila_zmq.envs import spec as env_spec
        from gorila_zmq.replay.memory import ReplayMemory
        self.index, self.spec = index, env_spec(cfg)
        self.E = cfg.env.num_envs
        self.lanes = actors_per_shard(cfg) * self.E
        self.rec = record_dtype(self.spec)
        self.memory = ReplayMemory(cfg.agent.replay_capacity, frame_shape=self.spec.frame_shape,
                                   stack=self.spec.stack, dtype=self.spec.dtype, n_step=cfg.agent.n_step,
                                   gamma=cfg.agent.gamma, lanes=self.lanes, name=f"gz_{cfg.run_id}_greplay{index}",
                                   action_shape=self.spec.action_shape, action_dtype=self.spec.action_dtype)
        self.open = np.zeros(self.lanes, bool)
        self.seqs: dict[int, tuple[int, int]] = {}      # actor -> (writer incarnation, last batch seq)
        self.rng = np.random.default_rng([cfg.run.seed, 3, index])
        self._batches: dict[int, tuple] = {}
        self.counters = {"records_in": 0, "batches_in": 0, "orphans_restarted": 0, "samples_out": 0,
                         "busy": 0, "rejected": 0, "duplicates": 0, "gaps": 0}
        self._logged: set = set()
        self.sock = P.make_socket(self.ctx, zmq.ROUTER, rcvhwm=64, sndhwm=64,
                                  maxmsgsize=self.rec.itemsize * 4096 + 65536)
        self.sock.bind(topology.replay(cfg, index).bind)
        from gorila_zmq.net import security
        self.auth = security.AuthMonitor(self.sock) if security.current() else None
        self.started = time.monotonic()
        log.info("replay shard %d: %d lanes, capacity %d", index, self.lanes, cfg.agent.replay_capacity)

    def step(self) -> None:
        if not self.sock.poll(100):
            return
        for _ in range(64):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.handle(frames)

    def _send(self, ident, hdr, payload=None) -> None:
        try:
            self.sock.send_multipart([ident] + P.message(hdr, payload), zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass

    def handle(self, frames) -> None:
        ident, req = frames[0].bytes, None
        try:
            req, payload = P.parse(frames[1:])
            if req.shard != self.index:
                raise P.ProtocolError(P.Status.BAD_SHARD, f"request for replay shard {req.shard} reached {self.index}")
            if req.command == P.Cmd.REPLAY_ADD:
                self._add(req, payload)
                return self._send(ident, P.Header(P.Cmd.REPLY, shard=self.index, seq=req.seq, client=req.client,
                                                  pversion=len(self.memory), status=P.Status.OK))
            if req.command == P.Cmd.REPLAY_SAMPLE:
                return self._sample(ident, req, payload)
            if req.command in (P.Cmd.STATS, P.Cmd.HELLO):
                return self._send(ident, P.Header(P.Cmd.REPLY, shard=self.index, seq=req.seq), self.stats())
            raise P.ProtocolError(P.Status.BAD_COMMAND, f"{P.Cmd(req.command).name} is not served by a replay shard")
        except Exception as e:  # noqa: BLE001 - nothing a peer sends may take the server down
            if not isinstance(e, P.ProtocolError):
                log.exception("replay %d: internal error handling a request", self.index)
                e = P.ProtocolError(P.Status.REJECTED, f"internal error: {type(e).__name__}")
            self.counters["rejected"] += 1
            if e.status not in self._logged:
                self._logged.add(e.status)
                log.warning("replay %d: rejected a request (%s): %s (logged once per kind)", self.index,
                            P.Status(e.status).name, e.detail)
            hdr, body = P.error_reply(req, e.status, e.detail, self.index)
            self._send(ident, hdr, body)

    def _add(self, req, payload) -> int:
        if req.dtype != P.Dtype.RAW or payload is None:
            raise P.ProtocolError(P.Status.BAD_DTYPE, "REPLAY_ADD carries RAW transition records")
        if payload.nbytes % self.rec.itemsize:
            raise P.ProtocolError(P.Status.BAD_SIZE, f"{payload.nbytes} bytes is not a whole number of "
                                  f"{self.rec.itemsize}-byte records (another environment?)")
        actor = req.client
        R = self.cfg.roles.replay_shards
        if actor >= self.cfg.roles.actors or actor % R != self.index:
            raise P.ProtocolError(P.Status.BAD_SHARD, f"actor {actor} does not write to replay shard {self.index}")
        recs = np.frombuffer(payload, dtype=self.rec)
        if recs.size == 0:
            return 0
        if (recs["kind"] > ADD).any() or (recs["lane"] >= self.E).any():
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, "record kind or lane out of range")
        if (recs["terminated"] > 1).any() or (recs["truncated"] > 1).any():
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, "a terminated/truncated flag not 0/1")
        a = recs["action"]
        if self.spec.continuous:
            if not (np.isfinite(a).all() and (np.abs(a) <= 1.0).all()):
                raise P.ProtocolError(P.Status.BAD_PAYLOAD, "continuous action not finite or outside [-1, 1]")
        elif ((a < 0) | (a >= self.spec.n_actions)).any():
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, f"action outside [0, {self.spec.n_actions})")
        # Each actor's batches apply once and in order: a retry that crossed its original is skipped;
        # a gap (a batch given up) or a restarted actor (new incarnation) closes its lanes, so the next
        # record starts a new partial episode instead of joining unrelated frames.
        inc, last = self.seqs.get(actor, (None, 0))
        if inc == req.incarnation and req.seq <= last:
            self.counters["duplicates"] += 1
            return 0
        base = (actor // R) * self.E
        if inc != req.incarnation or req.seq != last + 1:
            if inc is not None:
                self.counters["gaps"] += 1
            self.open[base:base + self.E] = False
        self.seqs[actor] = (req.incarnation, req.seq)
        if self.spec.dtype.kind == "f" and not np.isfinite(recs["frame"]).all():
            raise P.ProtocolError(P.Status.NON_FINITE, "observation with NaN or Inf")
        if not np.isfinite(recs["reward"]).all():
            raise P.ProtocolError(P.Status.NON_FINITE, "reward with NaN or Inf")
        for r in recs:
            lane = base + int(r["lane"])
            if r["kind"] == START:
                self.memory.start_episode(r["frame"], lane=lane)
                self.open[lane] = True
            elif not self.open[lane]:
                # The memory never saw this episode's start (this server restarted): begin a new
                # partial episode at this frame, losing one transition rather than the whole episode.
                self.counters["orphans_restarted"] += 1
                if not (r["terminated"] or r["truncated"]):
                    self.memory.start_episode(r["frame"], lane=lane)
                    self.open[lane] = True
            else:
                self.memory.add(r["action"] if self.spec.continuous else int(r["action"]), float(r["reward"]), r["frame"], bool(r["terminated"]),
                                bool(r["truncated"]), lane=lane)
                if r["terminated"] or r["truncated"]:
                    self.open[lane] = False
        self.counters["records_in"] += int(recs.size)
        self.counters["batches_in"] += 1
        return int(recs.size)

    def _sample(self, ident, req, payload) -> None:
        body = P.as_json(req, payload)
        B, min_size = body.get("batch"), body.get("min_size", 0)
        if type(B) is not int or not 1 <= B <= MAX_SAMPLE or type(min_size) is not int:
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, f"batch must be an integer in [1, {MAX_SAMPLE}], "
                                  "min_size an integer")
        if B not in self._batches:
            if len(self._batches) >= 4:          # a client cycling through sizes must not grow memory
                self._batches.clear()
            self._batches[B] = self.memory.allocate_batch(B, pinned=False)
        try:
            if len(self.memory) < max(min_size, 1):
                raise ValueError("not enough transitions")
            batch = self.memory.sample(B, self.rng, out=self._batches[B])
        except ValueError:                       # nothing valid yet: backpressure, not an error
            self.counters["busy"] += 1
            hdr, err = P.error_reply(req, P.Status.BUSY, f"replay holds {len(self.memory)} transitions", self.index)
            hdr.pversion = len(self.memory)
            return self._send(ident, hdr, err)
        buf = b"".join(np.ascontiguousarray(getattr(batch, k), dtype=d).tobytes()
                       for k, d, _ in batch_layout(self.spec, B))
        self.counters["samples_out"] += 1
        hdr = P.Header(P.Cmd.REPLY, shard=self.index, seq=req.seq, client=req.client, pversion=len(self.memory),
                       dtype=P.Dtype.RAW)
        self._send(ident, hdr, buf)

    def stats(self) -> dict:
        return {**self.memory.stats(), **self.counters, "role": "replay", "shard": self.index,
                "auth_failures": self.auth.poll() if self.auth else 0,
                "uptime_s": time.monotonic() - self.started}

    def close(self) -> None:
        if self.auth is not None:
            self.auth.close()
        self.sock.close(linger=0)
        self.memory.close()
        self.memory.unlink()
        super().close()


class ReplayWriter:
    """Actor side of global replay: same write calls as ReplayMemory (start_episode, add)."""

    FLUSH_RECORDS = 64
    FLUSH_S = 0.05

    def __init__(self, ctx, cfg, actor_index: int, spec):
        self.ctx, self.cfg, self.actor = ctx, cfg, actor_index
        self.shard = actor_index % cfg.roles.replay_shards
        self.endpoint = topology.replay(cfg, self.shard).connect
        self.rec = record_dtype(spec)
        self.buf = np.zeros(self.FLUSH_RECORDS, self.rec)
        self.n = 0
        self.first_at = 0.0
        self.window, self.timeout, self.retries = cfg.net.in_flight, cfg.net.request_timeout_s, cfg.net.request_retries
        self.pending: dict[int, list] = {}       # seq -> [payload, sent_at, tries]
        self.seq = 0
        self.incarnation = new_client_id()
        self.counters = {"records_sent": 0, "batches_acked": 0, "batches_dropped": 0, "retries": 0, "waits": 0}
        self.sock = self._connect()

    def _connect(self):
        s = P.make_socket(self.ctx, zmq.DEALER)
        s.connect(self.endpoint)
        return s

    def _put(self, kind, lane, frame, action=0, reward=0.0, terminated=False, truncated=False) -> None:
        if self.n == 0:
            self.first_at = time.monotonic()
        r = self.buf[self.n]
        r["kind"], r["lane"], r["frame"], r["action"], r["reward"] = kind, lane, frame, action, reward
        r["terminated"], r["truncated"] = terminated, truncated
        self.n += 1
        if self.n == self.FLUSH_RECORDS:
            self.flush()

    def start_episode(self, frame, lane: int = 0) -> None:
        self._put(START, lane, frame)

    def add(self, action, reward, next_frame, terminated, truncated, lane: int = 0) -> None:
        self._put(ADD, lane, next_frame, action, reward, terminated, truncated)

    def flush(self) -> None:
        if self.n == 0:
            return
        while len(self.pending) >= self.window:       # backpressure: the replay shard is behind
            self.counters["waits"] += 1
            self._drain(timeout_s=0.1)
        payload = self.buf[:self.n].tobytes()
        self.seq += 1
        self.pending[self.seq] = [payload, time.monotonic(), 0]
        self._send(self.seq, payload)
        self.counters["records_sent"] += self.n
        self.n = 0

    def _send(self, seq, payload) -> None:
        hdr = P.Header(P.Cmd.REPLAY_ADD, shard=self.shard, client=self.actor, seq=seq, dtype=P.Dtype.RAW,
                       incarnation=self.incarnation)
        self.sock.send_multipart(P.message(hdr, payload))

    def poll(self, timeout_s: float = 0.0) -> None:
        """Called once per actor step: send a batch that waited long enough, take acknowledgements."""
        if self.n and time.monotonic() - self.first_at >= self.FLUSH_S:
            self.flush()
        self._drain(timeout_s)

    def _drain(self, timeout_s: float) -> None:
        if self.pending and self.sock.poll(int(timeout_s * 1000)):
            while True:
                try:
                    hdr, _ = P.parse(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
                except P.ProtocolError:
                    continue
                if self.pending.pop(hdr.seq, None) is not None:
                    if hdr.command == P.Cmd.ERROR:
                        self.counters["batches_dropped"] += 1
                    else:
                        self.counters["batches_acked"] += 1
        now = time.monotonic()
        if self.pending and now - min(p[1] for p in self.pending.values()) > self.timeout:
            self.sock.close(linger=0)            # Lazy Pirate: new socket, resend (or give up)
            self.sock = self._connect()
            for seq, p in list(self.pending.items()):
                if p[2] >= self.retries:
                    del self.pending[seq]
                    self.counters["batches_dropped"] += 1
                    continue
                p[1], p[2] = now, p[2] + 1
                self.counters["retries"] += 1
                self._send(seq, p[0])

    def stats(self) -> dict:
        return dict(self.counters, shard=self.shard, in_flight=len(self.pending))

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is buffered and wait briefly for the acknowledgements."""
        try:
            self.flush()
            end = time.monotonic() + timeout_s
            while self.pending and time.monotonic() < end:
                self._drain(0.05)
        finally:
            self.sock.close(linger=0)


class RemoteBatch:
    def __init__(self, arrays: dict):
        self.__dict__.update(arrays)

    def as_tensors(self):
        import torch
        return RemoteBatch({k: torch.from_numpy(v) for k, v in self.__dict__.items()})


class RemoteSource:
    """Learner side of global replay: a batch from the shards in turn."""

    def __init__(self, ctx, cfg, learner_index: int, spec):
        self.ctx, self.cfg, self.spec = ctx, cfg, spec
        self.R = cfg.roles.replay_shards
        self.next = learner_index % self.R
        self.endpoints = [topology.replay(cfg, r).connect for r in range(self.R)]
        self.socks = [None] * self.R
        self.min_size = 0
        self.sizes = [0] * self.R
        self.client = new_client_id()
        self.seq = 0

    def _sock(self, r):
        if self.socks[r] is None:
            s = P.make_socket(self.ctx, zmq.DEALER)
            s.connect(self.endpoints[r])
            self.socks[r] = s
        return self.socks[r]

    def _request(self, r, hdr, payload, timeout_s):
        s = self._sock(r)
        s.send_multipart(P.message(hdr, payload))
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if s.poll(100):
                rh, body = P.parse(s.recv_multipart(copy=False))
                if rh.seq == hdr.seq:
                    return rh, body
        s.close(linger=0)
        self.socks[r] = None
        return None, None

    def ready(self, need: int) -> bool:
        self.min_size = need // self.R
        for r in range(self.R):
            self.seq += 1
            rh, body = self._request(r, P.Header(P.Cmd.STATS, shard=r, seq=self.seq), None, 1.0)
            if rh is None or rh.command != P.Cmd.REPLY:
                return False
            self.sizes[r] = P.as_json(rh, body, max_bytes=1 << 20).get("size", 0)
        return all(s >= self.min_size for s in self.sizes) and sum(self.sizes) >= need

    def allocate(self, B: int, pinned=None):
        pinned = pinned if pinned is not None else _cuda()
        arrays = {}
        for k, d, shape in batch_layout(self.spec, B):
            if pinned:
                import torch
                arrays[k] = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, d)).dtype).pin_memory().numpy()
            else:
                arrays[k] = np.empty(shape, d)
        return RemoteBatch(arrays)

    def sample(self, B: int, rng, out: RemoteBatch) -> RemoteBatch:
        while True:
            r = self.next
            self.next = (self.next + 1) % self.R
            self.seq += 1
            hdr = P.Header(P.Cmd.REPLAY_SAMPLE, shard=r, client=self.client, seq=self.seq)
            rh, body = self._request(r, hdr, {"batch": B, "min_size": self.min_size}, self.cfg.net.request_timeout_s)
            if rh is None or rh.command == P.Cmd.ERROR:
                time.sleep(0.05)                  # shard busy, filling up, or down: try the next one
                continue
            if body is None or body.nbytes != batch_nbytes(self.spec, B):
                continue
            off = 0
            for k, d, shape in batch_layout(self.spec, B):
                n = np.dtype(d).itemsize * math.prod(shape)
                np.copyto(getattr(out, k), np.frombuffer(body, dtype=d, count=math.prod(shape), offset=off).reshape(shape))
                off += n
            return out

    def close(self) -> None:
        for s in self.socks:
            if s is not None:
                s.close(linger=0)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str]) -> int:
    return role_main(argv, "replay", "Run one global replay shard.", lambda cfg, i: ReplayServer(cfg, i))
