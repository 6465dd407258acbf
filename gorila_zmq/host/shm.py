"""Named shared-memory segments owned by one process and readable by others on the same host: the one
way gorila-zmq creates, attaches, releases and removes them."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from multiprocessing import resource_tracker, shared_memory

_attach_lock = threading.Lock()


def _open(name: str, tracked: bool, **kw) -> shared_memory.SharedMemory:
    """SharedMemory(name, **kw), registered with multiprocessing's resource tracker only if `tracked`.
    The tracker unlinks what it knows of when the registering process dies (by SIGKILL too), and
    unregistering afterwards is not enough: spawned children share their parent's tracker."""
    if tracked:
        return shared_memory.SharedMemory(name=name, **kw)
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False, **kw)
    with _attach_lock:
        register = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None
        try:
            return shared_memory.SharedMemory(name=name, **kw)
        finally:
            resource_tracker.register = register


def create(name: str, nbytes: int, persist: bool = False) -> shared_memory.SharedMemory:
    """Create segment `name`, replacing a stale one left by a process that was SIGKILLed. With
    `persist`, the segment is not registered with the resource tracker: it outlives this process until
    someone removes it (a shard's successor re-adopts it; close it with release(..., owner=False))."""
    try:
        return _open(name, not persist, create=True, size=nbytes)
    except FileExistsError:
        remove(name)
        return _open(name, not persist, create=True, size=nbytes)


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with the resource tracker, which would unlink the segment when this
    (reader) process exits."""
    return _open(name, tracked=False)


def unlink(seg: shared_memory.SharedMemory, owner: bool) -> None:
    """Remove the segment's name (mappings stay valid until closed). A handle from attach() was never
    registered with the tracker, so its name is removed without unregistering it."""
    if owner or sys.version_info >= (3, 13):
        seg.unlink()
    else:
        import _posixshmem
        _posixshmem.shm_unlink(seg._name)       # noqa: SLF001 (the stdlib's own name for it)


_unlink_name = unlink          # release() takes a flag of the same name


def release(seg: shared_memory.SharedMemory | None, unlink: bool, owner: bool = True) -> None:
    """Close a segment this process created (owner=False: one made with persist=True, or attached),
    and remove its name if `unlink`."""
    if seg is None:
        return
    try:
        seg.close()
    except BufferError:
        pass  # a numpy view is still alive; the mapping goes with the process
    if unlink:
        with contextlib.suppress(FileNotFoundError):
            _unlink_name(seg, owner)


def remove(name: str) -> bool:
    """Remove segment `name` if it exists (a stale one of a killed process); True if it did."""
    try:
        seg = attach(name)
    except FileNotFoundError:
        return False
    seg.close()
    with contextlib.suppress(FileNotFoundError):
        unlink(seg, owner=False)
    return True


SHM_DIR = "/dev/shm"


def segments(prefix: str = "gz_") -> dict[str, int]:
    """This host's segments whose names start with `prefix`, with their sizes in bytes."""
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(SHM_DIR):
            if e.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    out[e.name] = e.stat().st_blocks * 512
    return out


def mapped() -> set[str]:
    """Names of the segments some live process of this host has mapped (from /proc/*/maps): a
    segment nobody maps belongs to no live run."""
    names = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(SHM_DIR + "/")
                    if i >= 0:
                        names.add(line[i + len(SHM_DIR) + 1:].split()[0])
        except OSError:
            continue
    return names
