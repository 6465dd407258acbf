"""Same-host gradient pushes through shared memory (`net.shm_push`, default `auto`).

A learner whose shard runs on its own host does not need to send the gradient's bytes through a
socket: its gradient buffers are named shared-memory segments, and a push to such a shard carries only
where the slice lies (protocol SHM_REF: segment name, byte offset, count; 88 bytes instead of 6.7 MB
for the Nature CNN). The shard maps the segment (once; the latest few stay mapped) and applies the
slice in place. The request, its reply, the window, retries and the (client, seq) dedup are those of a
socket push; only the payload moved.

- `host_identity()`: two processes share /dev/shm when both see the same kernel boot and the same
  /dev/shm inode (containers with a private /dev/shm do not). A shard says its identity in the HELLO
  reply; the pusher uses segments for the shards that match and sockets for the others.
- `GradientSegments` (the learner's side): each buffer is its own segment `gz_<run_id>_grad<client>_<k>`;
  a name is never reused, so a shard's mapping can never see another buffer under an old name. The
  pusher's ownership rule holds as for socket pushes: a buffer is rewritten only once every shard
  answered its push, and one given up on is dropped (its name removed), never rewritten.
- `SegmentReader` (the shard's side): only segments of this run's gradient prefix are attached, the
  range must lie inside the segment and hold exactly the shard's slice; a missing segment or anything
  else is a ProtocolError (a counted rejection), never a crash. The segments are created mode 0600:
  only the run's own user can write them.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re

import numpy as np

from gorila_zmq.host import shm
from gorila_zmq.net import protocol as P

_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def host_identity() -> str:
    """'<boot id>:<st_dev>:<st_ino>' of this process's /dev/shm, or '' where there is none (no
    same-host pushes then)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        st = os.stat(shm.SHM_DIR)
    except OSError:
        return ""
    return f"{boot}:{st.st_dev}:{st.st_ino}"


def prefix(run_id: str) -> str:
    return f"gz_{run_id}_grad"


class GradientSegments:
    """Flat float32 gradient buffers, each in a segment of its own, and the reference to a slice of one."""

    def __init__(self, run_id: str, client: int, size: int):
        self.base = f"{prefix(run_id)}{client:08x}_"
        self.size = size
        self.made = 0
        self._by_addr: dict[int, tuple[str, object]] = {}     # buffer address -> (name, segment)

    def new(self) -> np.ndarray:
        name = f"{self.base}{self.made}"
        self.made += 1
        seg = shm.create(name, 4 * self.size)
        arr = np.ndarray((self.size,), np.float32, seg.buf)
        self._by_addr[arr.ctypes.data] = (name, seg)
        return arr

    def ref(self, arr: np.ndarray) -> str | None:
        """The segment name when `arr` is one of these buffers (the whole of it), else None."""
        hit = self._by_addr.get(arr.ctypes.data)
        return hit[0] if hit is not None and arr.size == self.size else None

    def drop(self, arr: np.ndarray) -> None:
        """Remove a buffer's name (a shard that still maps it keeps its mapping until it lets go)."""
        hit = self._by_addr.pop(arr.ctypes.data, None)
        if hit is not None:
            shm.release(hit[1], unlink=True)

    def __len__(self) -> int:
        return len(self._by_addr)

    def close(self) -> None:
        for _, seg in self._by_addr.values():
            shm.release(seg, unlink=True)
        self._by_addr.clear()


class SegmentReader:
    """The shard's side: a read-only float32 view of the slice a SHM_REF push names."""

    def __init__(self, run_id: str, keep: int = 8):
        self.prefix, self.keep = prefix(run_id), keep
        self._open: collections.OrderedDict[str, object] = collections.OrderedDict()

    def view(self, hdr: P.Header, payload, count: int) -> np.ndarray:
        name, offset, n = P.parse_shm_ref(hdr, payload)
        if not name.startswith(self.prefix) or not _NAME.match(name):
            raise P.ProtocolError(P.Status.BAD_PAYLOAD, f"segment {name[:80]!r} is not one of this run's "
                                  f"gradient buffers ({self.prefix}...)")
        if n != count:
            raise P.ProtocolError(P.Status.OVERSIZED if n > count else P.Status.BAD_SIZE,
                                  f"shared-memory push of {n} floats, expected {count}")
        seg = self._open.get(name)
        if seg is None:
            try:
                seg = shm.attach(name)
            except (FileNotFoundError, ValueError, OSError) as e:
                raise P.ProtocolError(P.Status.BAD_PAYLOAD, f"segment {name!r} cannot be mapped: {e}") from None
            self._open[name] = seg
            while len(self._open) > self.keep:
                _, old = self._open.popitem(last=False)
                shm.release(old, unlink=False, owner=False)
        else:
            self._open.move_to_end(name)
        if offset % 4 or offset + 4 * n > seg.size:
            raise P.ProtocolError(P.Status.BAD_SIZE, f"bytes {offset}..{offset + 4 * n} are not float32s inside "
                                  f"segment {name!r} ({seg.size} bytes)")
        out = np.ndarray((n,), np.float32, seg.buf, offset)
        out.flags.writeable = False
        return out

    def close(self) -> None:
        for seg in self._open.values():
            with contextlib.suppress(Exception):
                shm.release(seg, unlink=False, owner=False)
        self._open.clear()
