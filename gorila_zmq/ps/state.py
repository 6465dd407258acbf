"""A shard's state: theta and the optimiser's state arrays in one shared-memory segment
`gz_<run>_ps<i>` ([header | theta | state 0 | state 1 ...]), and its checkpoints (npz, no pickle, written
atomically)."""
from __future__ import annotations

import json
import os

import numpy as np

from gorila_zmq.host import shm
from gorila_zmq.host.files import atomic_write

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
    """Atomic (host/files.py): a crash at any point leaves the previous checkpoint (or none) intact."""
    states = [states] if isinstance(states, np.ndarray) else list(states)
    with atomic_write(path) as f:
        np.savez(f, theta=theta, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **{f"state{k}": s for k, s in enumerate(states)})


def load_checkpoint(path: str) -> tuple[np.ndarray, list[np.ndarray], dict] | None:
    """(theta, [state arrays], meta), or None when there is no checkpoint."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        n = sum(1 for k in z.files if k.startswith("state"))
        return z["theta"].astype(np.float32), [z[f"state{k}"].astype(np.float32) for k in range(n)], meta
