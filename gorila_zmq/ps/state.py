"""A shard's state: theta, the optimiser's state arrays and the dedup table in one shared-memory segment
`gz_<run>_ps<i>` ([header | theta | state 0 | state 1 ... | dedup rows]), and its checkpoints (npz, no
pickle, written atomically).

The segment outlives the shard process (it is not registered with multiprocessing's resource tracker),
so a shard restarted on the same host re-adopts it and loses no applied update: `ShardState.adopt`
takes it when its magic, sizes, layout hash and run token match and no apply was in progress when the
process died (the header's `applying` marker is set around every change of theta, states, dedup and
version; a torn apply falls back to the checkpoint). Only a lost host rolls back to the checkpoint.

The dedup table: one row per client (four per learner of the run, at least 256; the least recently
seen evicted first), each with the highest seq decided and two 1,024-bit masks (decided, applied) of
the seqs up to it. A (client, seq) pair is applied at most once: a seq the row still covers gets its
first outcome back; a seq older than the row covers, or a retry (FLAG_RETRY) from a client the table
has forgotten, is refused as FORGOTTEN, never applied again. A retry is late by one request timeout,
so it stays inside the window while the client pushes fewer than ~1,000 times per timeout.
"""
from __future__ import annotations

import json
import os

import numpy as np

from gorila_zmq.host import shm
from gorila_zmq.host.files import atomic_write
from gorila_zmq.net import protocol as P

SHM_HEADER = 64          # bytes before theta: int64 [magic, version, size, n_states, layout, token, applying, clients]
MAGIC = 0x475A5053
DEDUP_WINDOW = 1024      # seqs per client whose outcome is remembered
DEDUP_MIN_CLIENTS = 256
_WORDS = DEDUP_WINDOW // 64
DEDUP_ROW = np.dtype([("client", "<u4"), ("pad", "<u4"), ("used", "<u8"), ("hi", "<u8"),
                      ("seen", "<u8", (_WORDS,)), ("applied", "<u8", (_WORDS,))])
_MASK = (1 << DEDUP_WINDOW) - 1


def _bits(words: np.ndarray) -> int:
    return int.from_bytes(words.tobytes(), "little")


def _words(bits: int) -> np.ndarray:
    return np.frombuffer(bits.to_bytes(DEDUP_WINDOW // 8, "little"), np.uint64)


def dedup_clients(cfg) -> int:
    """Rows of a shard's dedup table: four per learner of the run (restarted learners come back with
    new client ids), at least 256."""
    learners = cfg.roles.bundles if cfg.roles.mode == "bundled" else cfg.roles.learners
    return max(DEDUP_MIN_CLIENTS, 4 * learners)


def segment_bytes(size: int, n_states: int, clients: int) -> int:
    return SHM_HEADER + 4 * size * (1 + n_states) + DEDUP_ROW.itemsize * clients


def _i64(u: int) -> int:
    """A 64-bit unsigned value (layout hash, run token) as the int64 the header stores."""
    return u - (1 << 64) if u >= 1 << 63 else u


class DedupTable:
    """(client, seq) -> first outcome, over rows of DEDUP_ROW (in the shard's segment)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self._reindex()

    def _reindex(self) -> None:
        """The client -> row index and the clock, from the rows alone (they are all the state)."""
        rows = self.rows
        self.index = {int(c): k for k, (c, u) in enumerate(zip(rows["client"], rows["used"])) if u}
        self.clock = int(rows["used"].max()) if len(rows) else 0

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, client: int, seq: int, retry: bool) -> int | None:
        """The first outcome of (client, seq) (Status.APPLIED or STALE), Status.FORGOTTEN when it
        cannot be known, or None: not decided yet, apply it."""
        k = self.index.get(client)
        if k is None:
            return P.Status.FORGOTTEN if retry else None
        hi = int(self.rows["hi"][k])
        if seq > hi:
            return None
        d = hi - seq
        if d >= DEDUP_WINDOW:
            return P.Status.FORGOTTEN
        if _bits(self.rows["seen"][k]) >> d & 1:
            return P.Status.APPLIED if _bits(self.rows["applied"][k]) >> d & 1 else P.Status.STALE
        return None                          # an earlier push that arrived late: never decided

    def record(self, client: int, seq: int, applied: bool) -> None:
        k = self.index.get(client)
        if k is None:
            k = self._row_for(client)
        rows = self.rows
        hi, seen, app = int(rows["hi"][k]), _bits(rows["seen"][k]), _bits(rows["applied"][k])
        if seq > hi:
            shift = seq - hi
            seen = (seen << shift) & _MASK if shift < DEDUP_WINDOW else 0
            app = (app << shift) & _MASK if shift < DEDUP_WINDOW else 0
            hi = seq
        d = hi - seq
        seen |= 1 << d
        app = app | (1 << d) if applied else app & ~(1 << d)
        self.clock += 1
        rows["hi"][k], rows["seen"][k], rows["applied"][k], rows["used"][k] = hi, _words(seen), _words(app), self.clock

    def _row_for(self, client: int) -> int:
        k = int(np.argmin(self.rows["used"]))            # a free row (used 0), else the least recently seen
        if self.rows["used"][k]:
            del self.index[int(self.rows["client"][k])]
        self.rows[k] = 0
        self.rows["client"][k] = client
        self.index[client] = k
        return k

    def load(self, rows: np.ndarray) -> None:
        """Replace the table with saved rows (a checkpoint's), the most recently seen first if they
        do not all fit."""
        rows = rows[rows["used"] > 0]
        rows = rows[np.argsort(rows["used"])[::-1][:len(self.rows)]]
        self.rows[:] = 0
        self.rows[:len(rows)] = rows
        self._reindex()


class ShardState:
    """theta, the optimiser's state arrays and the dedup table of one shard, as views of a
    shared-memory segment. `adopted` says whether an existing consistent segment was taken over;
    `refused` why an existing one was not (None: there was none)."""

    def __init__(self, name: str, size: int, n_states: int = 1, clients: int = DEDUP_MIN_CLIENTS,
                 layout_hash: int = 0, token: int = 0, adopt: bool = False):
        self.name = name
        nbytes = segment_bytes(size, n_states, clients)
        want = (MAGIC, size, n_states, _i64(layout_hash), _i64(token), clients)
        self.seg, self.refused = self._adoptable(name, nbytes, want) if adopt else (None, None)
        self.adopted = self.seg is not None
        if self.seg is None:
            self.seg = shm.create(name, nbytes, persist=True)
        self.meta = np.ndarray((8,), np.int64, self.seg.buf, 0)
        self.theta = np.ndarray((size,), np.float32, self.seg.buf, SHM_HEADER)
        self.states = [np.ndarray((size,), np.float32, self.seg.buf, SHM_HEADER + 4 * size * (1 + k))
                       for k in range(n_states)]
        rows = np.ndarray((clients,), DEDUP_ROW, self.seg.buf, SHM_HEADER + 4 * size * (1 + n_states))
        if not self.adopted:
            self.meta[:] = 0
            rows[:] = 0
            (self.meta[0], self.meta[2], self.meta[3], self.meta[4], self.meta[5], self.meta[7]) = want
        self.dedup = DedupTable(rows)

    @staticmethod
    def _adoptable(name: str, nbytes: int, want: tuple):
        """(the live segment, None) if it can be adopted, else (None, why not; None when absent)."""
        try:
            seg = shm.attach(name)
        except FileNotFoundError:
            return None, None
        meta = np.ndarray((8,), np.int64, seg.buf, 0) if seg.size >= SHM_HEADER else None
        why = None
        if meta is None or seg.size < nbytes:
            why = f"it is {seg.size} bytes, this shard needs {nbytes}"
        elif (int(meta[0]), int(meta[2]), int(meta[3]), int(meta[4]), int(meta[5]), int(meta[7])) != want:
            why = "it belongs to another run, model or sharding"
        elif meta[6]:
            why = f"an apply was in progress at version {int(meta[1])} when its shard died (torn)"
        del meta
        if why is None:
            return seg, None
        seg.close()
        return None, why

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

    def begin(self) -> None:
        """Before changing theta, states, dedup or version: a process that dies before end() leaves a
        segment its successor will not adopt."""
        self.meta[6] = 1

    def end(self) -> None:
        self.meta[6] = 0

    def close(self, unlink: bool = True) -> None:
        self.meta = self.theta = None
        self.states = []
        self.dedup = None
        shm.release(self.seg, unlink=unlink, owner=False)


# -- checkpoints --------------------------------------------------------------------------------

def checkpoint_path(run_dir: str, index: int) -> str:
    return os.path.join(run_dir, "ckpt", f"ps{index}.npz")


def save_checkpoint(path: str, theta: np.ndarray, states, meta: dict, dedup: np.ndarray | None = None) -> None:
    """Atomic (host/files.py): a crash at any point leaves the previous checkpoint (or none) intact."""
    states = [states] if isinstance(states, np.ndarray) else list(states)
    extra = {} if dedup is None else {"dedup": dedup}
    with atomic_write(path) as f:
        np.savez(f, theta=theta, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **{f"state{k}": s for k, s in enumerate(states)}, **extra)


def load_checkpoint(path: str) -> tuple[np.ndarray, list[np.ndarray], dict] | None:
    """(theta, [state arrays], meta), or None when there is no checkpoint; meta["dedup_rows"] holds the
    saved dedup table when there is one."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        n = sum(1 for k in z.files if k.startswith("state"))
        if "dedup" in z.files and z["dedup"].dtype == DEDUP_ROW:
            meta["dedup_rows"] = z["dedup"]
        return z["theta"].astype(np.float32), [z[f"state{k}"].astype(np.float32) for k in range(n)], meta
