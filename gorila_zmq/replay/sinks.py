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

import collections
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

    def _put(self, kind, lane, frame, action=0, reward=0.0, terminated=False, truncated=False,
             priority: float | None = None) -> None:
        if self.n == 0:
            self.first_at = time.monotonic()
        r = self.buf[self.n]
        r["kind"], r["lane"], r["frame"], r["action"], r["reward"] = kind, lane, frame, action, reward
        r["has_priority"], r["priority"] = (0, 0.0) if priority is None else (1, priority)
        r["terminated"], r["truncated"] = terminated, truncated
        self.n += 1
        if self.n == self.FLUSH_RECORDS:
            self.flush()

    def start_episode(self, frame, lane: int = 0) -> None:
        self._put(START, lane, frame)

    def add(self, action, reward, next_frame, terminated, truncated, lane: int = 0,
            priority: float | None = None) -> None:
        self._put(ADD, lane, next_frame, action, reward, terminated, truncated, priority)

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


class InitialPriorities:
    """Ape-X's actor-side priorities, in front of a ReplayWriter: each step goes out with the actor's
    own n-step |TD error| for its transition,

        |r_t + g r_t+1 + ... + g^(n-1) r_t+n-1 + g^n max_a Q(s_t+n, a) - Q(s_t, a_t)|,

    from the Q values the actor computed anyway to act (`observe(q, actions)` after every act: q holds
    Q(s_t, .) for each lane). A step waits in its lane until its n-th successor's values come (at most
    n steps), so steps go out n steps late and in order. A termination ends the window early (no
    bootstrap, as the memory's n-step return); a truncation, or a close, sends the waiting steps
    without a priority (Q of the last observation was never computed): they enter at the shard's
    current max. The bootstrap is the actor's own network, not a target network (Ape-X's actors hold
    only the online parameters)."""

    def __init__(self, sink: ReplayWriter, lanes: int, n_step: int, gamma: float):
        self.sink, self.n, self.gamma = sink, int(n_step), float(gamma)
        # per lane, the steps waiting for their bootstrap: [action, reward, frame, terminated, Q(s,a), G, k, truncated]
        self.pending = [collections.deque() for _ in range(lanes)]
        self.q_sa = np.zeros(lanes, np.float64)
        self.counters = {"priorities_given": 0, "priorities_none": 0, "td_abs_sum": 0.0}

    def observe(self, q: np.ndarray, actions) -> None:
        """Q(s_t, .) per lane (E, A), and the actions about to be taken in s_t."""
        q = np.asarray(q, np.float64)
        boot = q.max(1)
        for lane, d in enumerate(self.pending):
            if d and d[0][6] == self.n:        # its n rewards are in: s_t is its bootstrap state
                self._emit(lane, d.popleft(), boot[lane])
        self.q_sa[:] = q[np.arange(q.shape[0]), np.asarray(actions, np.int64).reshape(-1)]

    def _emit(self, lane: int, e, bootstrap: float | None) -> None:
        action, reward, frame, terminated, q_sa, g, k, truncated = e
        if bootstrap is None:
            td = None
            self.counters["priorities_none"] += 1
        else:
            td = abs(g + (self.gamma ** k) * bootstrap - q_sa)
            self.counters["priorities_given"] += 1
            self.counters["td_abs_sum"] += td
        self.sink.add(action, reward, frame, terminated, truncated, lane=lane, priority=td)

    def start_episode(self, frame, lane: int = 0) -> None:
        self._flush(lane, None)
        self.sink.start_episode(frame, lane=lane)

    def add(self, action, reward, next_frame, terminated, truncated, lane: int = 0) -> None:
        d = self.pending[lane]
        for e in d:                              # every waiting window takes this reward
            e[5] += (self.gamma ** e[6]) * reward
            e[6] += 1
        d.append([action, reward, np.array(next_frame), bool(terminated), self.q_sa[lane], float(reward), 1,
                  bool(truncated)])
        if terminated:
            while d:
                self._emit(lane, d.popleft(), 0.0)   # the return ends here: nothing to bootstrap
        elif truncated:
            self._flush(lane, None)

    def _flush(self, lane: int, bootstrap) -> None:
        d = self.pending[lane]
        while d:
            self._emit(lane, d.popleft(), bootstrap)

    def poll(self) -> None:
        self.sink.poll()

    def stats(self) -> dict:
        c = self.counters
        given = c["priorities_given"]
        return dict(self.sink.stats(), priorities_given=given, priorities_none=c["priorities_none"],
                    mean_initial_td=c["td_abs_sum"] / given if given else None)

    def close(self) -> None:
        try:
            for lane in range(len(self.pending)):
                self._flush(lane, None)
        finally:
            self.sink.close()


def make_sink(ctx, cfg, index: int, record: Record):
    """Actor `index`'s sink: its bundle's memory (bundled mode) or a global replay shard (with the
    actor's own initial priorities in front when agent.actor_priorities)."""
    if cfg.roles.mode == "bundled":
        return LocalSink(cfg, index, record, lanes=cfg.env.num_envs)
    writer = ReplayWriter(ctx, cfg, index, record)
    if cfg.agent.actor_priorities:
        return InitialPriorities(writer, cfg.env.num_envs, cfg.agent.n_step, cfg.agent.gamma)
    return writer
