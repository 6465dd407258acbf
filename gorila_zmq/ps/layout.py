"""ParamLayout: a torch module's named parameters <-> one flat float32 vector, and its shard ranges.

Every role agrees on the layout by its 64-bit hash (names, shapes, dtypes in order); a shard refuses
any request that names another hash, so two different models can never silently mix.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass

import numpy as np

from gorila_zmq.host.files import atomic_write, write_json


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


class ParamLayout:
    def __init__(self, entries: list[tuple[str, tuple[int, ...], str]]):
        """entries: (name, shape, dtype-name) in module order; every dtype must be float32."""
        self.entries: list[Entry] = []
        off = 0
        desc = []
        for name, shape, dtype in entries:
            if dtype not in ("float32", "torch.float32"):
                raise ValueError(f"parameter {name} is {dtype}; gorila-zmq keeps float32 parameters")
            size = int(np.prod(shape)) if len(shape) else 1
            self.entries.append(Entry(name, tuple(int(s) for s in shape), off, size))
            off += size
            desc.append(f"{name}:{'x'.join(map(str, shape))}:float32")
        self.size = off
        self.hash = int.from_bytes(hashlib.blake2b(";".join(desc).encode(), digest_size=8).digest(), "little")

    @classmethod
    def from_module(cls, module) -> "ParamLayout":
        return cls([(n, tuple(p.shape), str(p.dtype).replace("torch.", ""))
                    for n, p in module.named_parameters()])

    def __repr__(self) -> str:
        return f"ParamLayout({len(self.entries)} tensors, {self.size:,} floats, hash={self.hash:016x})"

    # -- module <-> flat ------------------------------------------------------------------------
    def flatten(self, module, out: np.ndarray | None = None) -> np.ndarray:
        import torch
        out = np.empty(self.size, np.float32) if out is None else out
        with torch.no_grad():
            for e, (_, p) in zip(self.entries, module.named_parameters()):
                out[e.offset:e.offset + e.size] = p.detach().reshape(-1).cpu().numpy()
        return out

    def flatten_grads(self, module, out: np.ndarray | None = None) -> np.ndarray:
        """The gradient as a new flat float32 array (zeros where a parameter has no grad)."""
        out = np.empty(self.size, np.float32) if out is None else out
        for e, (_, p) in zip(self.entries, module.named_parameters()):
            if p.grad is None:
                out[e.offset:e.offset + e.size] = 0.0
            else:
                out[e.offset:e.offset + e.size] = p.grad.detach().reshape(-1).cpu().numpy()
        return out

    def views(self, flat):
        """Each parameter's slice of a flat torch tensor, shaped like the parameter (views, no copies)."""
        return [flat[e.offset:e.offset + e.size].view(e.shape) for e in self.entries]

    def load_into(self, module, flat: np.ndarray) -> None:
        """Copy the flat vector into the module's parameters (on whatever device they live)."""
        import torch
        if flat.shape != (self.size,):
            raise ValueError(f"flat vector has shape {flat.shape}, layout needs ({self.size},)")
        src = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        with torch.no_grad():
            for v, p in zip(self.views(src), module.parameters()):
                p.copy_(v, non_blocking=True)

    # -- sharding -------------------------------------------------------------------------------
    def shard_ranges(self, shards: int) -> list[tuple[int, int]]:
        return shard_ranges(self.size, shards)


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """S contiguous, near-equal [start, stop) ranges covering range(n) exactly once."""
    if shards < 1:
        raise ValueError("shards must be >= 1")
    if shards > n:
        raise ValueError(f"{shards} shards for {n} parameters: every shard needs at least one")
    base, extra = divmod(n, shards)
    out, start = [], 0
    for i in range(shards):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


# -- the layout recorded with a run ---------------------------------------------------------------
# RUN_DIR/layout.json (every tensor's name and shape, the hash, the shard ranges) and RUN_DIR/init.npy
# (the initial theta) are written once when the run is prepared (launch/program.py), so shards, status
# and the launchers know the layout without building a model or opening an environment.
LAYOUT_FILE, INIT_FILE = "layout.json", "init.npy"


def save_run_layout(run_dir: str, layout: ParamLayout, shards: int, theta0: np.ndarray) -> None:
    """Also a random token naming this run (not its directory): a shard re-adopts shared memory only
    of its own run, never of an earlier run prepared in the same directory."""
    with atomic_write(os.path.join(run_dir, INIT_FILE)) as f:
        np.save(f, np.ascontiguousarray(theta0, np.float32))
    rec = dict(layout_record(layout, shards), token=secrets.randbits(63) or 1)
    write_json(os.path.join(run_dir, LAYOUT_FILE), rec, indent=1)


def load_run_token(run_dir: str) -> int:
    """The run's token (0 for a run without one: a layout given by hand)."""
    try:
        with open(os.path.join(run_dir, LAYOUT_FILE)) as f:
            return int(json.load(f).get("token", 0))
    except FileNotFoundError:
        return 0


def layout_record(layout: ParamLayout, shards: int) -> dict:
    return {"hash": layout.hash, "size": layout.size, "shards": layout.shard_ranges(shards),
            "tensors": [[e.name, list(e.shape)] for e in layout.entries]}


def load_run_layout(run_dir: str) -> ParamLayout | None:
    """The run's recorded layout, or None where the run has none (a role started by hand)."""
    path = os.path.join(run_dir, LAYOUT_FILE)
    try:
        with open(path) as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    layout = ParamLayout([(name, tuple(shape), "float32") for name, shape in rec["tensors"]])
    if layout.hash != rec["hash"] or layout.size != rec["size"]:
        raise ValueError(f"{path} is inconsistent (hash or size do not match its tensors)")
    return layout


def load_init_slice(run_dir: str, start: int, stop: int) -> np.ndarray:
    """theta0[start:stop] from the run's init.npy (memory-mapped: a shard reads only its slice)."""
    return np.array(np.load(os.path.join(run_dir, INIT_FILE), mmap_mode="r")[start:stop], np.float32)
