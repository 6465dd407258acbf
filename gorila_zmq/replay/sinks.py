"""Where an actor's transitions go. Both sinks take the same calls (start_episode, add, poll, stats,
close), so the actor does not know which it writes to:

- `LocalSink` (bundled mode): the bundle's shared-memory ReplayMemory, created and owned by the actor
  (its learner attaches to it by name); closing it unlinks the memory.
- `ReplayWriter` (global mode): buffers packed records (replay/records.py), sends a batch every
  `FLUSH_RECORDS` or 50 ms to replay shard `actor % R`, at most `net.in_flight` batches unanswered
  (an actor faster than its replay shard waits), retried the Lazy Pirate way (net/rpc.Window).

Actor j writes to shard j % R, in lanes (j // R) * E .. + E - 1 (E = env.num_envs).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import zmq

from gorila_zmq.host import shm
from gorila_zmq.net import protocol as P, topology
from gorila_zmq.net.rpc import Window, new_client_id
from gorila_zmq.replay.memory import ReplayMemory
from gorila_zmq.replay.records import ADD, START, Record


def bundle_memory_name(cfg, i: int) -> str:
    """Shared-memory name of bundle i's local replay (actor i writes, learner i reads)."""
    return f"gz_{cfg.run_id}_replay{i}"


class LocalSink:
    def __init__(self, cfg, index: int, record: Record, lanes: int):
        name = bundle_memory_name(cfg, index)
        shm.remove(name)       # a predecessor killed with SIGKILL may have left it: this actor owns the name
        self.memory = ReplayMemory(cfg.agent.replay_capacity, n_step=cfg.agent.n_step, gamma=cfg.agent.gamma,
                                   lanes=lanes, name=name, **record.memory_args())

    def start_episode(self, frame, lane: int = 0) -> None:
        self.memory.start_episode(frame, lane=lane)

    def add(self, action, reward, next_frame, terminated, truncated, lane: int = 0) -> None:
        self.memory.add(action, reward, next_frame, terminated, truncated, lane=lane)

    def poll(self) -> None:
        pass

    def stats(self) -> dict:
        return self.memory.stats()

    def close(self) -> None:
        """Unmap and remove the memory (safe to call twice: the run loop and the owner may both close)."""
        self.memory.close()
        with contextlib.suppress(FileNotFoundError):
            self.memory.unlink()


class ReplayWriter:
    """Actor side of global replay."""

    FLUSH_RECORDS = 64
    FLUSH_S = 0.05

    def __init__(self, ctx, cfg, actor_index: int, record: Record):
        self.ctx, self.cfg, self.actor = ctx, cfg, actor_index
        self.shard = actor_index % cfg.roles.replay_shards
        self.endpoint = topology.replay(cfg, self.shard).connect
        self.rec = record.wire_dtype()
        self.buf = np.zeros(self.FLUSH_RECORDS, self.rec)
        self.n = 0
        self.first_at = 0.0
        self.window = Window(cfg.net.in_flight, cfg.net.request_timeout_s, cfg.net.request_retries)
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
        while self.window.full():                    # backpressure: the replay shard is behind
            self.counters["waits"] += 1
            self._drain(timeout_s=0.1)
        self.seq += 1
        hdr = P.Header(P.Cmd.REPLAY_ADD, shard=self.shard, client=self.actor, seq=self.seq, dtype=P.Dtype.RAW,
                       incarnation=self.incarnation)
        frames = P.message(hdr, self.buf[:self.n].tobytes())
        self.sock.send_multipart(frames)
        self.window.sent(self.seq, frames)
        self.counters["records_sent"] += self.n
        self.n = 0

    def poll(self, timeout_s: float = 0.0) -> None:
        """Called once per actor step: send a batch that waited long enough, take acknowledgements."""
        if self.n and time.monotonic() - self.first_at >= self.FLUSH_S:
            self.flush()
        self._drain(timeout_s)

    def _drain(self, timeout_s: float) -> None:
        if len(self.window) and self.sock.poll(int(timeout_s * 1000)):
            while True:
                try:
                    hdr, _ = P.parse(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
                except P.ProtocolError:
                    continue
                if self.window.answered(hdr.seq):
                    self.counters["batches_dropped" if hdr.command == P.Cmd.ERROR else "batches_acked"] += 1
        if self.window.expired():
            self.sock.close(linger=0)            # Lazy Pirate: new socket, resend (or give up)
            self.sock = self._connect()
            self.counters["batches_dropped"] += len(self.window.resend(self.sock))
            self.counters["retries"] += len(self.window)

    def stats(self) -> dict:
        return dict(self.counters, shard=self.shard, in_flight=len(self.window))

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is buffered and wait briefly for the acknowledgements."""
        try:
            self.flush()
            end = time.monotonic() + timeout_s
            while len(self.window) and time.monotonic() < end:
                self._drain(0.05)
        finally:
            self.sock.close(linger=0)


def make_sink(ctx, cfg, index: int, record: Record):
    """Actor `index`'s sink: its bundle's memory (bundled mode) or a global replay shard."""
    if cfg.roles.mode == "bundled":
        return LocalSink(cfg, index, record, lanes=cfg.env.num_envs)
    return ReplayWriter(ctx, cfg, index, record)
