"""Where a learner's batches come from. Every source takes the same calls, so the learner does not know
which it reads: `ready(need)` (holds `need` transitions?), `allocate(B)` (an empty batch to sample
into), `sample(B, rng, out)` (fills `out`; raises NotReady while nothing can be sampled yet, and any
other error is a real one), `refresh()` (between two samples, from the sampling thread) and `close()`.
`inserted` (an int the sampling thread keeps current in `refresh()`) counts the transitions ever
inserted into what the source samples, across restarts of its writers: the learner's side of the
replay-ratio limiter reads it.

Prioritized replay (`agent.prioritized`): batches also carry `weight`, `index` and `position`;
`beta` (an attribute the learner sets) is the importance-sampling exponent of the next samples;
`write_back(batch, td_abs)` (the learner's thread, after the gradient, before the batch is reused)
queues the new priorities, and the sampling thread applies or sends them in `refresh()`, so every
priority operation happens on the thread that samples.

- `LocalSource` (bundled mode): the bundle's shared-memory ring, written by the bundle's actor.
- `RemoteSource` (global mode): batches from the global replay shards in turn, over ZeroMQ.
- `MemorySource`: a ReplayMemory this process already holds (benchmarks, tests).
"""
from __future__ import annotations

import collections
import logging
import math
import os
import time

import numpy as np

from gorila_zmq.net import protocol as P, topology
from gorila_zmq.net.rpc import Client, Unavailable, new_client_id
from gorila_zmq.replay.memory import NotReady, ReplayMemory
from gorila_zmq.replay.priority import PrioritizedReplay
from gorila_zmq.replay.records import PRIORITY, Record
from gorila_zmq.replay.sinks import bundle_memory_name

log = logging.getLogger("gorila_zmq.replay.sources")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


_MAX_PENDING = 64      # write-backs queued for the sampling thread; beyond this the oldest are dropped


class _WriteBacks:
    """Priorities queued by the learner's thread for the sampling thread (deque: thread-safe ends)."""

    def __init__(self):
        self.pending: collections.deque = collections.deque()
        self.dropped = 0

    def put(self, item) -> None:
        self.pending.append(item)
        while len(self.pending) > _MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1

    def drain(self):
        while self.pending:
            yield self.pending.popleft()


class InsertCount:
    """Transitions inserted into one or more memories, as a total that only grows: each memory's own
    counter adds what it grew by; a counter that went back (a recreated memory, a restarted shard) or
    a memory replaced by another (a new `key`) counts from 0 again."""

    def __init__(self, n: int = 1):
        self.last = [(None, 0)] * n
        self.total = 0

    def see(self, i: int, count: int, key=None) -> int:
        k, last = self.last[i]
        self.total += count - last if (key == k and count >= last) else count
        self.last[i] = (key, count)
        return self.total


class MemorySource:
    """A replay memory this process already holds; `priorities` (a PriorityReplay config: alpha, eps)
    samples it by priority."""

    def __init__(self, rb: ReplayMemory, prioritized: dict | None = None, batch_layout: str = "auto"):
        self.rb, self.prioritized, self.batch_layout = rb, prioritized, batch_layout
        self.pr = None
        self.beta = 1.0
        self.gen = 0                     # which memory a batch came from (LocalSource swaps them)
        self.writebacks = _WriteBacks()
        self.inserts = InsertCount()
        self.inserted = 0
        if rb is not None:
            self._adopt(rb)

    def _adopt(self, rb: ReplayMemory) -> None:
        self.rb = rb
        self.gen += 1
        if self.prioritized is not None:
            self.pr = PrioritizedReplay(rb, **self.prioritized)

    def ready(self, need: int) -> bool:
        self._count()
        return len(self.rb) >= need

    def _count(self) -> None:
        if self.rb is not None:
            self.inserted = self.inserts.see(0, self.rb.transitions_added(), key=self.gen)

    def allocate(self, B: int):
        """A batch to sample into: shared frames (agent.batch_layout) where this memory allows them."""
        shared = self.batch_layout == "frames" or (self.batch_layout == "auto" and self.rb.shares_frames)
        return self.rb.allocate_batch(B, prioritized=self.prioritized is not None, shared_frames=shared)

    def sample(self, B: int, rng, out):
        if self.pr is None:
            return self.rb.sample(B, rng, out=out)
        self.pr.sample(B, rng, out=out, beta=self.beta)
        out.gen = self.gen
        return out

    def write_back(self, batch, td_abs) -> None:
        self.writebacks.put((batch.gen, batch.index.copy(), batch.position.copy(), np.asarray(td_abs)))

    def _apply_writebacks(self) -> None:
        for gen, idx, pos, td in self.writebacks.drain():
            if gen == self.gen and self.pr is not None:     # not for a memory since replaced
                self.pr.update(idx, pos, td)

    def priority_stats(self) -> dict:
        return {**self.pr.stats(), "writebacks_dropped": self.writebacks.dropped} if self.pr else {}

    def refresh(self) -> None:
        self._apply_writebacks()
        self._count()

    def close(self) -> None:
        pass


class LocalSource(MemorySource):
    """Bundle replay in shared memory, owned by the bundle's actor. When the actor is restarted (a new
    segment under the same name), the loader thread switches to the new memory between two samples,
    once it holds `need` transitions; until then it keeps sampling the old one (its mapping stays
    valid after the unlink)."""

    def __init__(self, cfg, index: int):
        super().__init__(None, priority_args(cfg), cfg.agent.batch_layout)
        self.name = bundle_memory_name(cfg, index)
        self._ino = None
        self._next_check = 0.0
        self._need = 1
        self._pending = None          # (handle, inode) of a recreated memory still filling up

    def _path_ino(self):
        try:
            return os.stat(f"/dev/shm/{self.name}").st_ino
        except OSError:
            return None

    def _attach_new(self) -> None:
        ino = self._path_ino()
        if ino is None or ino == self._ino or (self._pending and self._pending[1] == ino):
            return
        try:
            new = ReplayMemory.attach(self.name)
        except (FileNotFoundError, ValueError):      # gone again, or its creator is still writing the header
            return
        if self._pending is not None:
            self._pending[0].close()
        self._pending = (new, ino)

    def ready(self, need: int) -> bool:
        """Before the loader starts (main thread): attached, and holding `need` transitions?"""
        self._need = need
        self.refresh(force=self.rb is None)
        return self.rb is not None and len(self.rb) >= need

    def refresh(self, force: bool = False) -> None:
        """Once a second: adopt a recreated memory when it is full enough. Only the thread that
        samples calls this, so no sample is ever in flight on a handle being closed."""
        self._apply_writebacks()
        self._count()
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + 1.0
        self._attach_new()
        if self._pending is not None and (self.rb is None or len(self._pending[0]) >= self._need):
            if self.rb is not None:
                log.info("replay %s was recreated (actor restarted): switched to the new memory", self.name)
                self.pr = None
                self.rb.close()
            self._adopt(self._pending[0])
            self._ino = self._pending[1]
            self._pending = None

    def close(self) -> None:
        for rb in (self.rb, self._pending[0] if self._pending else None):
            if rb is not None:
                rb.close()


class RemoteBatch:
    def __init__(self, arrays: dict):
        self.__dict__.update(arrays)

    def as_tensors(self):
        import torch
        return RemoteBatch({k: torch.from_numpy(v) for k, v in self.__dict__.items() if isinstance(v, np.ndarray)})


def priority_args(cfg) -> dict | None:
    """PrioritizedReplay's arguments from the config, or None for uniform replay."""
    a = cfg.agent
    return {"alpha": a.priority_alpha, "eps": a.priority_eps, "weight_norm": a.priority_weight_norm} \
        if a.prioritized else None


class RemoteSource:
    """Learner side of global replay: a batch from the shards in turn; with prioritized replay, each
    batch's priorities go back to the shard that served it."""

    def __init__(self, ctx, cfg, learner_index: int, record: Record):
        self.cfg, self.record = cfg, record
        self.prioritized = cfg.agent.prioritized
        self.beta = 1.0
        self.writebacks = _WriteBacks()
        self.priority_counters = {"priority_updates_sent": 0, "priority_updates_failed": 0}
        self.R = cfg.roles.replay_shards
        self.next = learner_index % self.R
        self.clients = [Client(ctx, topology.replay(cfg, r).connect) for r in range(self.R)]
        self.min_size = 0
        self.sizes = [0] * self.R
        self.client = new_client_id()
        self.inserts = InsertCount(self.R)
        self.inserted = 0
        self._count_every = 0.25 if cfg.agent.max_steps_per_update > 0 and cfg.agent.max_updates_ahead > 0 else None
        self._next_count = 0.0

    def _stats(self, r: int, timeout_s: float = 1.0) -> dict:
        rh, body = self.clients[r].request(P.Header(P.Cmd.STATS, shard=r), timeout_s=timeout_s, retries=0)
        st = P.as_json(rh, body, max_bytes=1 << 20)
        self.inserted = self.inserts.see(r, int(st.get("transitions_added", 0)))
        return st

    def ready(self, need: int) -> bool:
        self.min_size = need // self.R
        for r in range(self.R):
            try:
                self.sizes[r] = self._stats(r).get("size", 0)
            except (Unavailable, P.ProtocolError):
                return False
        return all(s >= self.min_size for s in self.sizes) and sum(self.sizes) >= need

    def allocate(self, B: int, pinned: bool | None = None) -> RemoteBatch:
        pinned = _cuda() if pinned is None else pinned
        arrays = {}
        for k, d, shape in self.record.batch_layout(B, self.prioritized):
            if pinned:
                import torch
                arrays[k] = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, d)).dtype).pin_memory().numpy()
            else:
                arrays[k] = np.empty(shape, d)
        return RemoteBatch(arrays)

    def sample(self, B: int, rng, out: RemoteBatch) -> RemoteBatch:
        """One batch from the next shard that has one (each tried once, in turn); NotReady when every
        shard is busy (filling up) or down."""
        for _ in range(self.R):
            r = self.next
            self.next = (self.next + 1) % self.R
            hdr = P.Header(P.Cmd.REPLAY_SAMPLE, shard=r, client=self.client)
            ask = {"batch": B, "min_size": self.min_size}
            if self.prioritized:
                ask["beta"] = float(self.beta)
            try:
                rh, body = self.clients[r].request(hdr, ask,
                                                   timeout_s=self.cfg.net.request_timeout_s, retries=0)
            except Unavailable:
                continue                          # down: try the next one
            except P.ProtocolError as e:
                if e.status == P.Status.BUSY:
                    continue                      # filling up
                raise RuntimeError(f"replay shard {r} refused a sample of {B}: {e}") from e
            want = self.record.batch_nbytes(B, self.prioritized)
            if body is None or body.nbytes != want:
                raise RuntimeError(f"replay shard {r} sent {0 if body is None else body.nbytes} bytes for a "
                                   f"batch of {B}, expected {want}: does it run another environment or agent, "
                                   f"or is one of the two prioritized and the other not (agent.prioritized)?")
            off = 0
            for k, d, shape in self.record.batch_layout(B, self.prioritized):
                n = math.prod(shape)
                np.copyto(getattr(out, k), np.frombuffer(body, dtype=d, count=n, offset=off).reshape(shape))
                off += np.dtype(d).itemsize * n
            out.shard = r
            return out
        raise NotReady("every replay shard is filling up or down")

    def write_back(self, batch, td_abs) -> None:
        rec = np.empty(len(batch.index), PRIORITY)
        rec["index"], rec["position"], rec["td_abs"] = batch.index, batch.position, td_abs
        self.writebacks.put((batch.shard, rec))

    def priority_stats(self) -> dict:
        return {**self.priority_counters, "writebacks_dropped": self.writebacks.dropped} if self.prioritized else {}

    def refresh(self) -> None:
        """Send the queued priorities, each to the shard that served its batch (one short request each;
        a shard that is down or refuses them loses them: they are hints, not state). With the learner's
        side of the replay-ratio limiter on, every 0.25 s: the shards' insert counts (STATS)."""
        if self._count_every is not None and time.monotonic() >= self._next_count:
            self._next_count = time.monotonic() + self._count_every
            for r in range(self.R):
                try:
                    self._stats(r)
                except (Unavailable, P.ProtocolError):
                    pass                          # down: its count is read again next time
        for r, rec in self.writebacks.drain():
            hdr = P.Header(P.Cmd.REPLAY_PRIORITY, shard=r, client=self.client, dtype=P.Dtype.RAW)
            try:
                self.clients[r].request(hdr, rec.tobytes(), timeout_s=self.cfg.net.request_timeout_s, retries=0)
                self.priority_counters["priority_updates_sent"] += 1
            except (Unavailable, P.ProtocolError) as e:
                self.priority_counters["priority_updates_failed"] += 1
                log.warning("replay shard %d: priority update not applied: %s", r, e)

    def close(self) -> None:
        for c in self.clients:
            c.close()


def make_source(ctx, cfg, index: int, record: Record):
    """Learner `index`'s source: its bundle's memory (bundled mode) or the global replay shards."""
    if cfg.roles.mode == "bundled":
        return LocalSource(cfg, index)
    return RemoteSource(ctx, cfg, index, record)
