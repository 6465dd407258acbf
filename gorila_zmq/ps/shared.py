"""theta for a whole host from one subscriber (net.param_relay): the relay role subscribes to every
shard once and writes each slice into a shared-memory segment; the host's actors and learners read it
from there (`SharedParams`, the same reader interface as ParamSubscriber). A shard's broadcast then
goes to every host once, not to every role: its bytes out grow with hosts, not with subscribers.

Segment `gz_<run>_params<k>` (k: the relay's index, one per host of actors and learners):
    header   64 B   magic, updates (every slice written), ready, beat (the writer's monotonic ns), size, shards
    slots    S x 64 B, one per shard: seq (odd while its slice is being written), version, incarnation, alive
    theta    float32 x size
Each slice has its own sequence lock: a reader copies a slice, and keeps it only if the slice's seq was
even and unchanged around the copy; so a slice is never torn, and a reader never blocks the writer.
This relies on stores and loads to the segment not being reordered, as on x86-64 (total store order).
"""
from __future__ import annotations

import os
import time

import numpy as np

from gorila_zmq.host import shm
from gorila_zmq.net import topology
from gorila_zmq.ps.subscriber import ParamSubscriber

MAGIC = 0x475A504152414D53        # "GZPARAMS"
HEADER = 64
SLOT = 64


def segment_name(cfg, k: int) -> str:
    return f"gz_{cfg.run_id}_params{k}"


def segment_bytes(size: int, shards: int) -> int:
    return HEADER + SLOT * shards + 4 * size


class _Segment:
    """Views of a params segment: header, per-shard slots, theta."""

    def __init__(self, seg, size: int, shards: int):
        self.seg = seg
        self.head = np.ndarray((8,), np.int64, seg.buf, 0)
        self.slots = np.ndarray((shards, SLOT // 8), np.int64, seg.buf, HEADER)
        self.theta = np.ndarray((size,), np.float32, seg.buf, HEADER + SLOT * shards)

    def drop(self) -> None:
        self.head = self.slots = self.theta = None


class SharedParamsWriter:
    """The relay's side: a ParamSubscriber hands it every slice it applies (ParamSubscriber(store=...))."""

    def __init__(self, name: str, size: int, ranges: list[tuple[int, int]]):
        self.name, self.ranges = name, ranges
        self.seg = shm.create(name, segment_bytes(size, len(ranges)))
        self.v = _Segment(self.seg, size, len(ranges))
        self.v.head[:] = 0
        self.v.slots[:] = 0
        self.v.slots[:, 1] = -1                        # no version yet
        self.v.head[4], self.v.head[5] = size, len(ranges)
        self.beat()
        self.v.head[0] = MAGIC                         # last: a reader never sees a half-made header

    def write(self, i: int, arr: np.ndarray, version: int, incarnation: int) -> None:
        a, b = self.ranges[i]
        slot = self.v.slots[i]
        slot[0] += 1                                   # odd: being written
        self.v.theta[a:b] = arr
        slot[1], slot[2] = version, incarnation
        slot[0] += 1
        self.v.head[1] += 1
        if not self.v.head[2] and (self.v.slots[:, 1] >= 0).all():
            self.v.head[2] = 1

    def set_alive(self, alive: list[bool]) -> None:
        self.v.slots[:, 3] = alive

    def beat(self) -> None:
        self.v.head[3] = time.monotonic_ns()

    def close(self) -> None:
        if self.v is not None:
            self.v.drop()
            self.v = None
            shm.release(self.seg, unlink=True)


class SharedParams:
    """A role's side: the latest theta of its host's relay, read from shared memory. The interface of
    ParamSubscriber that roles use: wait_ready, latest, updates, versions, global_version, alive, close.
    If the relay is restarted (a new segment under the same name), the reader attaches to the new one."""

    def __init__(self, name: str, size: int, shards: int, ranges: list[tuple[int, int]]):
        self.name, self.size, self.n, self.ranges = name, size, shards, ranges
        self.v: _Segment | None = None
        self._seg = None
        self._ino = None
        self._checked = 0.0
        self.counters = {"attaches": 0, "retries": 0}

    # -- attaching ------------------------------------------------------------------------------
    def _attach(self) -> bool:
        try:
            ino = os.stat(f"/dev/shm/{self.name}").st_ino if os.path.isdir("/dev/shm") else None
            seg = shm.attach(self.name)
        except FileNotFoundError:
            return False
        if seg.size < segment_bytes(self.size, self.n):
            seg.close()
            raise ValueError(f"{self.name} holds {seg.size} bytes, this model needs {segment_bytes(self.size, self.n)}: "
                             "the relay runs another model")
        v = _Segment(seg, self.size, self.n)
        if int(v.head[0]) != MAGIC:
            v.drop()
            seg.close()
            return False
        self._detach()
        self.v, self._seg, self._ino = v, seg, ino
        self.counters["attaches"] += 1
        return True

    def _detach(self) -> None:
        if self.v is not None:
            self.v.drop()
            self.v = None
            try:
                self._seg.close()
            except BufferError:
                pass

    def _fresh(self) -> _Segment | None:
        """The current segment, re-attaching (at most once a second) when the relay made a new one."""
        now = time.monotonic()
        if self.v is None or now - self._checked > 1.0:
            self._checked = now
            try:
                ino = os.stat(f"/dev/shm/{self.name}").st_ino if os.path.isdir("/dev/shm") else self._ino
            except FileNotFoundError:
                ino = None
            if self.v is None or (ino is not None and ino != self._ino):
                self._attach()
        return self.v

    # -- the reader interface -------------------------------------------------------------------
    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        end = time.monotonic() + timeout_s
        while True:
            v = self._fresh()
            if v is not None and v.head[2]:
                return True
            if time.monotonic() > end:
                return False
            self._checked = 0.0
            time.sleep(0.05)

    def latest(self, out: np.ndarray | None = None) -> tuple[np.ndarray, list[int], int]:
        """A copy of theta (each slice consistent with its version), the versions, the update count."""
        v = self._fresh()
        out = np.empty(self.size, np.float32) if out is None else out
        if v is None:
            return out, [-1] * self.n, 0
        versions = []
        updates = int(v.head[1])
        for i, (a, b) in enumerate(self.ranges):
            slot = v.slots[i]
            while True:
                s1 = int(slot[0])
                if not s1 & 1:
                    np.copyto(out[a:b], v.theta[a:b])
                    ver = int(slot[1])
                    if int(slot[0]) == s1:
                        break
                self.counters["retries"] += 1
                time.sleep(0)
            versions.append(ver)
        return out, versions, updates

    def resnapshot(self, i: int) -> None:
        """A shard refused a push as AHEAD. The relay's own subscriber re-snapshots a shard that came
        back (its incarnation changed); a reader can only look for a new segment at once."""
        self._checked = 0.0

    @property
    def updates(self) -> int:
        v = self._fresh()
        return int(v.head[1]) if v is not None else 0

    @property
    def versions(self) -> list[int]:
        v = self._fresh()
        return [int(x) for x in v.slots[:, 1]] if v is not None else [-1] * self.n

    @property
    def global_version(self) -> int:
        return self.versions[0]

    @property
    def alive(self) -> list[bool]:
        v = self._fresh()
        return [bool(x) for x in v.slots[:, 3]] if v is not None else [False] * self.n

    def close(self, timeout_s: float = 0.0) -> None:
        self._detach()


def param_source(ctx, shards, cfg, role: str):
    """Where a role reads theta: its host's relay (net.param_relay) or a subscriber of its own."""
    if cfg.net.param_relay:
        k = topology.relay_index(cfg, role)
        return SharedParams(segment_name(cfg, k), shards.layout.size, shards.n, shards.ranges)
    return ParamSubscriber(ctx, shards)
