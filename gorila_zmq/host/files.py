"""Atomic file writes: every file gorila-zmq owns (checkpoints, configs, the layout, state files) is
written to a temporary file beside it, fsynced, renamed over the old one, and its directory fsynced. A
crash at any point leaves the previous file (or none) intact and readable, never a torn one."""
from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """`with atomic_write(path) as f: f.write(...)`: the file appears whole at `path` when the block
    ends, or not at all when it raises (the partial temporary file is removed)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):     # a full disk must not also leave a partial file behind
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json(path: str, obj, **kw) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, **kw)


def remove_stale_temporaries(path: str) -> None:
    """Temporary files of `path` left by a process killed while writing it."""
    d, base = os.path.split(os.path.abspath(path))
    if os.path.isdir(d):
        for name in os.listdir(d):
            if name.startswith(base + ".tmp-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(d, name))
