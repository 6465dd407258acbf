"""Named shared-memory segments owned by one process and readable by others on the same host: the one
way gorila-zmq creates, attaches, releases and removes them."""
from __future__ import annotations

import contextlib
import sys
import threading
from multiprocessing import resource_tracker, shared_memory

_attach_lock = threading.Lock()


def create(name: str, nbytes: int) -> shared_memory.SharedMemory:
    """Create segment `name`, replacing a stale one left by a process that was SIGKILLed."""
    try:
        return shared_memory.SharedMemory(name=name, create=True, size=nbytes)
    except FileExistsError:
        remove(name)
        return shared_memory.SharedMemory(name=name, create=True, size=nbytes)


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with the resource tracker, which would unlink the segment when this
    (reader) process exits; unregistering afterwards is not enough, because spawned children share
    their parent's tracker and a shared registration would be dropped for the creator too."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    with _attach_lock:
        register = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register


def unlink(seg: shared_memory.SharedMemory, owner: bool) -> None:
    """Remove the segment's name (mappings stay valid until closed). A handle from attach() was never
    registered with the tracker, so its name is removed without unregistering it."""
    if owner or sys.version_info >= (3, 13):
        seg.unlink()
    else:
        from multiprocessing import _posixshmem
        _posixshmem.shm_unlink(seg._name)       # noqa: SLF001 (the stdlib's own name for it)


def release(seg: shared_memory.SharedMemory | None, unlink: bool) -> None:
    """Close a segment this process created, and remove its name if `unlink`."""
    if seg is None:
        return
    try:
        seg.close()
    except BufferError:
        pass  # a numpy view is still alive; the mapping goes with the process
    if unlink:
        with contextlib.suppress(FileNotFoundError):
            seg.unlink()


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
