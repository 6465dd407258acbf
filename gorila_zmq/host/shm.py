"""Named shared-memory segments owned by one process and readable by others on the same host."""
from __future__ import annotations

from multiprocessing import resource_tracker, shared_memory


def create(name: str, nbytes: int) -> shared_memory.SharedMemory:
    """Create segment `name`, replacing a stale one left by a process that was SIGKILLed."""
    try:
        return shared_memory.SharedMemory(name=name, create=True, size=nbytes)
    except FileExistsError:
        old = shared_memory.SharedMemory(name=name)
        old.close()
        old.unlink()
        return shared_memory.SharedMemory(name=name, create=True, size=nbytes)


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach without taking ownership: Python 3.11's resource tracker would otherwise unlink the
    segment when this (reader) process exits."""
    seg = shared_memory.SharedMemory(name=name)
    try:
        resource_tracker.unregister(seg._name, "shared_memory")  # noqa: SLF001 (stdlib private name)
    except Exception:  # pragma: no cover - tracker details differ across versions
        pass
    return seg


def release(seg: shared_memory.SharedMemory | None, unlink: bool) -> None:
    if seg is None:
        return
    try:
        seg.close()
    except BufferError:
        pass  # a numpy view is still alive; the mapping goes with the process
    if unlink:
        try:
            seg.unlink()
        except FileNotFoundError:
            pass
