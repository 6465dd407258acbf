"""Shared-memory replay memory: one writer process (an actor, or a replay server), many reader
processes (learners) on one host, each frame stored once, stacks and n-step returns rebuilt at sample
time straight into a caller's preallocated batch.

Writer (the process that steps the environments)::

    rb = ReplayMemory(1_000_000, frame_shape=(84, 84), stack=4, dtype=np.uint8,
                      n_step=1, gamma=0.99, lanes=1, name=None)   # creates the segment (rb.name)
    rb.start_episode(first_frame, lane=0)          # the frame observed at reset
    rb.add(action, reward, next_frame, terminated, truncated, lane=0)   # after every step
    rb.add_batch(actions, rewards, next_frames, terminated, truncated, lanes=None)  # E steps at once

Frames are single frames (84x84 for Atari), never stacks: the memory stacks them. For vector
observations use frame_shape=(4,), dtype=np.float32, stack=1. Continuous actions: action_shape=(A,),
action_dtype=np.float32 (default: scalar int64).

Reader (any process on the same host)::

    rb = ReplayMemory.attach(name)                 # validates the header; never unlinks it
    batch = rb.allocate_batch(32)                  # pinned torch memory when CUDA is present
    rb.sample(32, rng, out=batch)                  # fills batch in place (GIL released while copying)
    batch.obs, batch.action, batch.reward, batch.discount, batch.next_obs, batch.index
    t = batch.as_tensors()                          # torch views (the pinned tensors themselves)

Batch fields, for B = batch_size: obs and next_obs (B, *rb.obs_shape) of `dtype`, where obs_shape is
(stack, *frame_shape), or frame_shape when stack == 1; action (B, *action_shape); reward float32, the
n-step return r_t + g r_{t+1} + ... + g^(k-1) r_{t+k-1}; discount float32, g^k, or 0 when the episode
terminated within the k steps; index int64, the slot of obs's newest frame (lane = index //
rb.lane_capacity). k = n_step, or fewer where the episode ends first: a window never extends past an
episode end. At a truncation, next_obs is the real final observation and discount is g^k > 0
(bootstrap); at a termination it is 0. Frames from before an episode's first frame are zeros, or,
with stack_padding="repeat", copies of that first frame (DrQ-v2's frame stack). full_windows=True
samples only windows of n steps or cut short by a termination (DrQ-v2's replay): the last n - 1
transitions before a truncation are never drawn.

Sampling is uniform over the valid transitions of all lanes: transitions whose n-step window is
fully written and within one episode, whose stack is still retained, and that do not touch the slot
the writer overwrites next.

Lanes: `lanes=E` splits the capacity into E independent rings (lane_capacity = capacity // E each),
one per episode stream, so an actor stepping E environments writes into one memory. With a
gymnasium vector env (autoreset NEXT_STEP), per step: call start_episode(obs[i], lane=i) for the envs
whose previous step ended (that step is their reset), add_batch(..., lanes=the others) for the rest.

Storage (gorila_zmq/_ext/replay from ext/replay.pyx, or NumpyCore): each lane is a ring of slots;
a slot holds one frame plus the action, reward and flags of the transition that led to it (START
marks an episode's first frame: no transition). An episode of T steps takes T + 1 slots; `capacity`
counts slots. Per slot: frame bytes + action bytes + 4 (reward) + 1 (flags), 7,069 bytes for Atari.

Concurrency (seqlock): per lane, a monotonically increasing counter of slots written lives in the
header; the writer publishes it (release store) after writing a slot. A reader snapshots the
counters, draws and gathers, then re-reads them and redraws every row whose lowest slot may have been
overwritten in between. A handle is safe to share between threads for sampling as long as each
thread samples into its own batch; only one process (and thread) may write.

Ownership: the creating handle owns the segment: `unlink()` (or leaving the `with` block) destroys
its name, and Python's resource tracker unlinks it if the creator dies. Attached handles are not
tracked (Python 3.11's tracker would otherwise unlink the segment when a reader exits). Pickling a
handle (e.g. as an argument to a spawned process) attaches in the receiver.

GORILA_PUREPYTHON=1 selects the NumPy implementation; both share the segment layout, so a Cython
writer and a NumPy reader interoperate.
"""
from __future__ import annotations

import atexit
import os
import secrets
import sys
import weakref
from dataclasses import dataclass, field, fields
from multiprocessing import shared_memory

import numpy as np

from gorila_zmq._native import load_ext, try_load_ext
from gorila_zmq.host import shm as host_shm
from gorila_zmq.replay.numpy_core import START, TERMINATED, TRUNCATED, NumpyCore
from gorila_zmq.replay.segment import HEAD, HEADER_BYTES, MAGIC, Layout, check_dtype, validate_params

__all__ = ["ReplayMemory", "Batch", "IMPLEMENTATION", "START", "TERMINATED", "TRUNCATED"]

_ext = load_ext("replay")
IMPLEMENTATION = "numpy" if _ext is None else "cython"


_MAX_ROUNDS = 10_000      # seqlock redraw rounds before giving up (a writer lapping every gather)


# ---------------------------------------------------------------- shared memory

_open_handles: "weakref.WeakSet[ReplayMemory]" = weakref.WeakSet()


@atexit.register
def _close_open_handles() -> None:
    # Unmap before interpreter teardown, which would otherwise close the segment while NumPy views
    # of it are alive ("BufferError: cannot close exported pointers exist").
    for rb in list(_open_handles):
        rb.close()


def _check_shm_space(nbytes: int) -> None:
    """A tmpfs smaller than the segment (docker's 64 MB /dev/shm) fails with SIGBUS on first write
    past the limit, long after creation; fail here instead, with the fix."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"):
        return
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise MemoryError(f"replay memory needs {nbytes / 2**30:.2f} GiB of shared memory but /dev/shm "
                          f"has {free / 2**30:.2f} GiB free (in docker: --shm-size)")


def _layout(capacity, frame_shape, stack, dtype, n_step, gamma, lanes, action_shape, action_dtype,
            stack_padding="zeros", full_windows=False) -> Layout:
    capacity, lanes = int(capacity), int(lanes)
    frame_shape = (frame_shape,) if isinstance(frame_shape, (int, np.integer)) else frame_shape
    if lanes < 1 or capacity < lanes:
        raise ValueError(f"need capacity >= lanes >= 1, got capacity={capacity}, lanes={lanes}")
    lay = Layout(lanes, capacity // lanes, int(stack), int(n_step), float(gamma), tuple(int(s) for s in frame_shape),
                 check_dtype(dtype), tuple(int(s) for s in action_shape), check_dtype(action_dtype),
                 stack_padding, bool(full_windows))
    validate_params(lay)
    return lay


def segment_bytes(capacity: int, frame_shape=(84, 84), stack: int = 4, dtype=np.uint8, n_step: int = 1,
                  gamma: float = 0.99, lanes: int = 1, *, action_shape=(), action_dtype=np.int64,
                  stack_padding: str = "zeros", full_windows: bool = False) -> int:
    """The size of the segment ReplayMemory(...) with these arguments would create (nothing is made)."""
    return _layout(capacity, frame_shape, stack, dtype, n_step, gamma, lanes, action_shape,
                   action_dtype, stack_padding, full_windows).offsets()["total"]


# ---------------------------------------------------------------- batches

class NotReady(ValueError):
    """sample() found no valid transition yet: wait for the writer (any other error is a real one)."""


@dataclass(eq=False)
class Batch:
    """One minibatch, filled in place by ReplayMemory.sample (see the module docstring)."""
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    discount: np.ndarray
    next_obs: np.ndarray
    index: np.ndarray
    frames: np.ndarray | None = None          # the shared-frames layout: obs and next_obs are views of it
    _tensors: "Batch | None" = field(default=None, repr=False)
    _scratch: dict | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.reward.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not f.name.startswith("_") and getattr(self, f.name) is not None}

    def as_tensors(self) -> "Batch":
        """The same memory as torch tensors (no copy): the pinned tensors when allocated pinned.
        In the shared-frames layout, obs and next_obs are views of the `frames` tensor.

        With pinned memory, copy to the GPU with .to(device, non_blocking=True) and do not sample
        into this batch again before that copy has finished (double-buffer two batches)."""
        if self._tensors is None:
            import torch
            t = {k: torch.from_numpy(v) for k, v in self.arrays().items()}
            if self.frames is not None:
                t["obs"], t["next_obs"] = shared_views(t["frames"])
            self._tensors = type(self)(**t)
        return self._tensors


def shared_views(frames):
    """obs and next_obs of a shared-frames batch (B, stack + 1, *frame_shape), as views (NumPy or
    torch, on any device): each row's frames 0..stack-1 and 1..stack."""
    return frames[:, :-1], frames[:, 1:]


@dataclass(eq=False)
class PrioritizedBatch(Batch):
    """A Batch from PrioritizedReplay.sample: also the importance weights and each row's logical
    position (what PrioritizedReplay.update checks against overwrites)."""
    weight: np.ndarray = None
    position: np.ndarray = None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# ---------------------------------------------------------------- the memory

class ReplayMemory:
    """A frame-deduplicated replay ring in shared memory (see the module docstring)."""

    def __init__(self, capacity: int, frame_shape=(84, 84), stack: int = 4, dtype=np.uint8,
                 n_step: int = 1, gamma: float = 0.99, lanes: int = 1, name: str | None = None, *,
                 action_shape=(), action_dtype=np.int64, stack_padding: str = "zeros",
                 full_windows: bool = False, impl: str | None = None):
        """Create the segment. capacity counts slots (frames) across all lanes; each lane gets
        capacity // lanes. impl ("cython"/"numpy") overrides GORILA_PUREPYTHON, for tests."""
        lay = _layout(capacity, frame_shape, stack, dtype, n_step, gamma, lanes, action_shape, action_dtype,
                      stack_padding, full_windows)
        off = lay.offsets()
        _check_shm_space(off["total"])
        name = name or f"gzrb_{os.getpid()}_{secrets.token_hex(4)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=off["total"])
        try:
            head = lay.pack(off["total"])
            shm.buf[8:len(head)] = head[8:]
            shm.buf[HEADER_BYTES:off["frames"]] = bytes(off["frames"] - HEADER_BYTES)
            shm.buf[:8] = MAGIC                  # last: an attacher never sees a half-made header
            self._setup(shm, lay, owner=True, impl=impl)
        except BaseException:
            shm.close()
            shm.unlink()
            raise

    @classmethod
    def attach(cls, name: str, *, impl: str | None = None, **expect) -> "ReplayMemory":
        """Open an existing memory by name (any process on the host). Keyword arguments, e.g.
        frame_shape=(84, 84), stack=4, dtype=np.uint8, are checked against its header."""
        shm = host_shm.attach(name)
        try:
            if shm.size < HEAD.size:
                raise ValueError(f"shared memory {name!r} ({shm.size} bytes) is too small to be a "
                                 f"gorila-zmq replay memory")
            lay, total = Layout.unpack(bytes(shm.buf[:HEAD.size]), name)
            if total != lay.offsets()["total"] or shm.size < total:
                raise ValueError(f"replay memory {name!r}: header says {total} bytes, layout needs "
                                 f"{lay.offsets()['total']}, segment has {shm.size}")
            self = cls.__new__(cls)
            self._setup(shm, lay, owner=False, impl=impl)
        except BaseException:
            shm.close()
            raise
        for key, want in expect.items():
            have = getattr(self, key, None) if not key.startswith("_") else None
            ok = (np.dtype(want) == have if key in ("dtype", "action_dtype") else
                  tuple(want) == have if key in ("frame_shape", "action_shape") else want == have)
            if not ok:
                self.close()
                raise ValueError(f"replay memory {name!r} has {key}={have!r}, expected {want!r}")
        return self

    def _setup(self, shm, lay: Layout, owner: bool, impl: str | None) -> None:
        if impl is None:
            ext = _ext
        elif impl == "cython":
            ext = try_load_ext("replay")
            if ext is None:
                raise ImportError("the compiled replay kernel is not built (python setup.py build_ext --inplace)")
        elif impl == "numpy":
            ext = None
        else:
            raise ValueError(f"impl must be 'cython', 'numpy' or None, got {impl!r}")
        self._shm, self._lay, self._owner = shm, lay, owner
        self.implementation = "numpy" if ext is None else "cython"
        off = lay.offsets()
        self._seg = np.frombuffer(shm.buf, np.uint8, count=off["total"])
        self._writes = self._seg[off["writes"]:off["writes"] + 8 * lay.lanes].view(np.int64)
        self._episodes = self._seg[off["episodes"]:off["episodes"] + 8 * lay.lanes].view(np.int64)
        core_cls = NumpyCore if ext is None else ext.Core
        self._core = core_cls(self._seg, off["writes"], off["episodes"], off["frames"], off["actions"],
                              off["rewards"], off["flags"], lay.lanes, lay.lane_capacity, lay.stack,
                              lay.n_step, lay.frame_nbytes, lay.action_nbytes, lay.gamma,
                              lay.stack_padding == "repeat", lay.full_windows)
        self._zero_action = np.zeros(lay.action_nbytes, np.uint8)
        self._rng = np.random.default_rng()
        self._detect_torn = True          # tests switch it off to show that detection is needed
        self._torn_redraws = 0
        _open_handles.add(self)

    # ------------------------------------------------------------ properties

    name = property(lambda self: self._shm.name.lstrip("/"))
    capacity = property(lambda self: self._lay.lanes * self._lay.lane_capacity)
    lane_capacity = property(lambda self: self._lay.lane_capacity)
    lanes = property(lambda self: self._lay.lanes)
    frame_shape = property(lambda self: self._lay.frame_shape)
    stack = property(lambda self: self._lay.stack)
    dtype = property(lambda self: self._lay.dtype)
    n_step = property(lambda self: self._lay.n_step)
    gamma = property(lambda self: self._lay.gamma)
    action_shape = property(lambda self: self._lay.action_shape)
    action_dtype = property(lambda self: self._lay.action_dtype)
    stack_padding = property(lambda self: self._lay.stack_padding)
    full_windows = property(lambda self: self._lay.full_windows)
    owner = property(lambda self: self._owner)
    nbytes = property(lambda self: self._lay.offsets()["total"])

    @property
    def obs_shape(self) -> tuple:
        """Per-sample obs shape: (stack, *frame_shape), or frame_shape when stack == 1."""
        lay = self._lay
        return lay.frame_shape if lay.stack == 1 else (lay.stack, *lay.frame_shape)

    @property
    def bytes_per_slot(self) -> int:
        return self._lay.frame_nbytes + self._lay.action_nbytes + 5

    def slot_flags(self) -> np.ndarray:
        """A view of the slots' flags, (lanes, lane_capacity) uint8 (START, TERMINATED, TRUNCATED): slots
        below the published write counts are final. Do not keep it past close()."""
        self._live()
        lay, off = self._lay, self._lay.offsets()
        n = lay.lanes * lay.lane_capacity
        return self._seg[off["flags"]:off["flags"] + n].reshape(lay.lanes, lay.lane_capacity)

    def _live(self):
        if self._core is None:
            raise ValueError("replay memory is closed")
        return self._core

    def __len__(self) -> int:
        """Slots in use (frames stored): about the transitions stored, plus one per episode."""
        return int(np.minimum(self._writes_now(), self._lay.lane_capacity).sum())

    def _writes_now(self) -> np.ndarray:
        self._live()
        return self._writes.copy()

    def transitions_added(self) -> int:
        """Transitions written since the memory was made (episode starts not counted); never decreases."""
        return int((self._writes_now() - self._episodes).sum())

    def stats(self) -> dict:
        w, ep = self._writes_now(), self._episodes.copy()
        return {"capacity": self.capacity, "lanes": self.lanes, "size": len(self),
                "frames_written": int(w.sum()), "episodes": int(ep.sum()),
                "transitions_added": int((w - ep).sum()), "bytes": self.nbytes,
                "torn_redraws": self._torn_redraws, "implementation": self.implementation}

    # ------------------------------------------------------------ writer

    def _lane(self, lane) -> int:
        lane = int(lane)
        if not 0 <= lane < self._lay.lanes:
            raise IndexError(f"lane {lane} out of range [0, {self._lay.lanes})")
        return lane

    def _frame(self, frame, lead: tuple = ()) -> np.ndarray:
        f = np.ascontiguousarray(frame, dtype=self._lay.dtype)
        if f.shape != lead + self._lay.frame_shape:
            raise ValueError(f"frame shape {f.shape} != {lead + self._lay.frame_shape}")
        return f

    def start_episode(self, first_frame, lane: int = 0) -> None:
        """Begin an episode on `lane` with the frame observed at reset. An episode still open on
        that lane (no terminated/truncated step) is ended as truncated at its last frame."""
        self._live().write(self._lane(lane), self._frame(first_frame), self._zero_action, 0.0, START)

    def add(self, action, reward: float, next_frame, terminated: bool, truncated: bool,
            lane: int = 0) -> None:
        """Record one step of `lane`: the action taken, its reward, and the frame it produced."""
        a = np.asarray(action, dtype=self._lay.action_dtype)   # (ascontiguousarray makes 0-d 1-d)
        if not a.flags.c_contiguous:
            a = a.copy()
        if a.shape != self._lay.action_shape:
            raise ValueError(f"action shape {a.shape} != {self._lay.action_shape}")
        fl = (TERMINATED if terminated else 0) | (TRUNCATED if truncated else 0)
        lane = self._lane(lane)
        if not self._live().write(lane, self._frame(next_frame), a, float(reward), fl):
            raise RuntimeError(f"add: lane {lane} has no open episode; call start_episode first")

    def add_batch(self, action, reward, next_frame, terminated, truncated, lanes=None) -> None:
        """add() for E steps at once, in order: entry i goes to lanes[i] (default: lane i)."""
        f = np.ascontiguousarray(next_frame, dtype=self._lay.dtype)
        E = f.shape[0] if f.ndim > len(self._lay.frame_shape) else -1
        f = self._frame(f, (E,))
        a = np.ascontiguousarray(action, dtype=self._lay.action_dtype)
        if a.shape != (E, *self._lay.action_shape):
            raise ValueError(f"action shape {a.shape} != {(E, *self._lay.action_shape)}")
        r = np.ascontiguousarray(np.broadcast_to(np.asarray(reward, np.float32), (E,)))
        fl = (np.where(np.broadcast_to(terminated, (E,)), TERMINATED, 0)
              | np.where(np.broadcast_to(truncated, (E,)), TRUNCATED, 0)).astype(np.uint8)
        ln = np.arange(E, dtype=np.int64) if lanes is None else np.ascontiguousarray(lanes, np.int64)
        if ln.shape != (E,) or (E and (ln.min() < 0 or ln.max() >= self._lay.lanes)):
            raise IndexError(f"lanes must be {E} indices in [0, {self._lay.lanes})")
        bad = self._live().write_many(ln, f, a, r, fl)
        if bad >= 0:
            raise RuntimeError(f"add_batch: entry {bad} (lane {ln[bad]}) has no open episode; "
                               f"the {bad} entries before it were written")

    # ------------------------------------------------------------ readers

    @property
    def shares_frames(self) -> bool:
        """Can a batch use the shared-frames layout (allocate_batch(shared_frames=True))? With n_step
        1 every next_obs is its obs shifted by one frame, so a row of stack + 1 frames holds both."""
        return self._lay.n_step == 1 and self._lay.stack > 1

    def allocate_batch(self, batch_size: int, pinned: bool | None = None, prioritized: bool = False,
                       shared_frames: bool = False) -> Batch:
        """An empty Batch to sample into. pinned=None pins (page-locked torch tensors, viewed as
        NumPy arrays; Batch.as_tensors() returns the tensors) when torch.cuda.is_available(), so
        the learner can copy to the GPU with non_blocking=True; otherwise plain NumPy arrays.

        shared_frames=True (n_step 1, stack > 1: see shares_frames): one `frames` array of rows of
        stack + 1 frames, with obs and next_obs its views (memory.shared_views), so a sample writes
        5 frames per Atari row instead of 8 and a learner copies `frames` alone to its device."""
        B, lay = int(batch_size), self._lay
        if B < 1:
            raise ValueError(f"batch_size must be >= 1, got {B}")
        if shared_frames and not self.shares_frames:
            raise ValueError(f"shared_frames needs n_step 1 and a frame stack (this memory: n_step "
                             f"{lay.n_step}, stack {lay.stack}): only then is next_obs obs shifted by a frame")
        spec = self._batch_spec(B, shared_frames)
        cls = Batch
        if prioritized:         # PrioritizedReplay fills these: the importance weights, the positions
            spec.update(weight=((B,), np.float32), position=((B,), np.int64))
            cls = PrioritizedBatch
        if pinned is None:
            pinned = _cuda_available()
        if not pinned:
            a = {k: np.zeros(s, d) for k, (s, d) in spec.items()}
            t = None
        else:
            import torch
            t = {k: torch.zeros(s, dtype=torch.from_numpy(np.empty(0, d)).dtype, pin_memory=True)
                 for k, (s, d) in spec.items()}
            a = {k: v.numpy() for k, v in t.items()}
        if shared_frames:
            a["obs"], a["next_obs"] = shared_views(a["frames"])
            if t is not None:
                t["obs"], t["next_obs"] = shared_views(t["frames"])
        return cls(**a, _tensors=None if t is None else cls(**t))

    def _batch_spec(self, B: int, shared_frames: bool) -> dict:
        """Each batch array's (shape, dtype): what allocate_batch makes and _check_batch expects."""
        lay = self._lay
        obs = ((B, *self.obs_shape), lay.dtype)
        spec = {"obs": obs, "action": ((B, *lay.action_shape), lay.action_dtype), "reward": ((B,), np.float32),
                "discount": ((B,), np.float32), "next_obs": obs, "index": ((B,), np.int64)}
        if shared_frames:
            del spec["obs"], spec["next_obs"]
            spec["frames"] = ((B, lay.stack + 1, *lay.frame_shape), lay.dtype)
        return spec

    def _check_batch(self, out: Batch, B: int) -> dict:
        sc = out._scratch
        key = (id(self._lay), B, id(out.obs), id(out.action), id(out.reward), id(out.discount),
               id(out.next_obs), id(out.index), id(out.frames))
        if sc is not None and sc["ok_for"] == key:
            return sc              # validated before, and the same arrays
        lay = self._lay
        shared = out.frames is not None
        if shared and not self.shares_frames:
            raise ValueError(f"a shared-frames batch needs a memory with n_step 1 and a frame stack "
                             f"(this one: n_step {lay.n_step}, stack {lay.stack})")
        want = self._batch_spec(B, shared)
        for k, (shape, dt) in want.items():
            a = getattr(out, k)
            if (not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dt
                    or not a.flags.c_contiguous or not a.flags.writeable):
                got = (getattr(a, "shape", None), getattr(a, "dtype", type(a)))
                raise ValueError(f"out.{k} must be a writeable C-contiguous {np.dtype(dt)} array of "
                                 f"shape {shape}, got {got}")
        sc = {"ok_for": key, "rows": np.arange(B, dtype=np.int64),
              "row_lane": np.zeros(B, np.int64), "row_low": np.zeros(B, np.int64),
              "torn": np.zeros(B, np.int64)}
        if shared:              # the kernel writes `frames`: obs and next_obs must be its views
            views = shared_views(out.frames)
            for k, v in zip(("obs", "next_obs"), views):
                a = getattr(out, k)
                if not (isinstance(a, np.ndarray) and a.shape == v.shape and a.strides == v.strides
                        and a.__array_interface__["data"][0] == v.__array_interface__["data"][0]):
                    raise ValueError(f"out.{k} must be the view memory.shared_views(out.frames) gives")
        sc["args"] = (out.frames if shared else out.obs, None if shared else out.next_obs, out.action, out.reward,
                      out.discount, out.index, sc["row_lane"], sc["row_low"])
        out._scratch = sc
        return sc

    def sample(self, batch_size: int, rng: np.random.Generator | None = None,
               out: Batch | None = None, draw=None) -> Batch:
        """Draw batch_size transitions uniformly from the valid ones into `out` (allocated if None;
        its leading dim must be batch_size) and return it. Raises ValueError while none is valid.

        draw(m, total, w, lo, cum) -> x replaces the uniform candidates (PrioritizedReplay): at most
        m values in [0, 1), candidate u = floor(x * total) of the snapshot; invalid ones are redrawn."""
        core = self._live()
        B = int(batch_size)
        if out is None:
            out = self.allocate_batch(B, pinned=False)
        sc = self._check_batch(out, B)
        rng = self._rng if rng is None else rng
        L = self._lay.lanes
        w, lo, cum = np.empty(L, np.int64), np.empty(L, np.int64), np.empty(L, np.int64)
        need = sc["rows"]
        for _ in range(_MAX_ROUNDS):
            total = core.snapshot(w, lo, cum)
            if total == 0:
                raise NotReady("sample: the replay memory holds no transition yet")
            filled = self._fill(core, rng, total, w, lo, cum, need, out, sc) if draw is None \
                else self._fill_drawn(core, draw, total, w, lo, cum, need, out, sc)
            sc["w_last"] = w
            if not self._detect_torn:
                return out
            nbad = core.torn(need, filled, sc["row_lane"], sc["row_low"], sc["torn"])
            if nbad == 0:
                return out
            self._torn_redraws += nbad
            need = sc["torn"][:nbad].copy()
        raise RuntimeError("sample: every draw was overwritten while being gathered: the writer laps "
                           "the ring faster than a batch is gathered (increase capacity)")

    def _fill(self, core, rng, total, w, lo, cum, need, out, sc) -> int:
        n, filled, drawn, tries = need.shape[0], 0, 0, 0
        args = sc["args"]
        # Rejection sampling: uniform over retained slots, conditioned on validity = uniform over
        # valid ones. Few are invalid (episode starts, the head); where most are, enumerate.
        while filled < n and (tries < 4 or filled * 8 >= drawn) and tries < 64:
            m = n - filled
            m += (m >> 2) + 4
            filled = core.gather(rng.random(m), total, w, lo, cum, need, filled, *args)
            drawn += m
            tries += 1
        for _ in range(4):
            if filled >= n:
                break
            valid = np.empty(total, np.int64)
            nv = core.valid_u(w, lo, cum, valid)
            if nv == 0:
                raise NotReady(f"sample: no valid transition yet ({total} slots stored; a transition "
                                 f"needs its n_step={self._lay.n_step} window written)")
            x = (valid[rng.integers(0, nv, size=n - filled, dtype=np.int64)] + 0.5) / total
            filled = core.gather(x, total, w, lo, cum, need, filled, *args)
        return filled

    def _fill_drawn(self, core, draw, total, w, lo, cum, need, out, sc) -> int:
        n, filled = need.shape[0], 0
        for _ in range(64):
            if filled >= n:
                return filled
            filled = core.gather(np.ascontiguousarray(draw(n - filled, total, w, lo, cum), np.float64), total,
                                 w, lo, cum, need, filled, *sc["args"])
        raise NotReady(f"sample: {n - filled} of {n} prioritized draws found no valid transition in 64 "
                       f"rounds (too few transitions yet?)")

    def _snapshot(self, listing: bool):
        L = self._lay.lanes
        w, lo, cum = np.empty(L, np.int64), np.empty(L, np.int64), np.empty(L, np.int64)
        total = self._live().snapshot(w, lo, cum)
        if not listing:
            return w, lo, cum, self._core.valid_u(w, lo, cum)
        valid = np.empty(total, np.int64)
        nv = self._core.valid_u(w, lo, cum, valid)
        return w, lo, cum, valid[:nv]

    def num_valid(self) -> int:
        """How many transitions sample() can return right now. A scan of the whole memory (a few
        ms per million slots): to wait for data, poll len(rb) instead."""
        return int(self._snapshot(False)[3])

    def valid_indices(self) -> np.ndarray:
        """The slots (Batch.index values) of every valid transition, by lane, oldest first."""
        w, lo, cum, u = self._snapshot(True)
        lane = np.searchsorted(cum, u, side="right") - 1
        return lane * self._lay.lane_capacity + (lo[lane] + u - cum[lane]) % self._lay.lane_capacity

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Unmap this handle (idempotent). The segment lives on until unlinked."""
        if self._core is None:
            return
        self._core.release()
        self._core = self._seg = self._writes = self._episodes = None
        self._shm.close()
        _open_handles.discard(self)

    def unlink(self) -> None:
        """Destroy the segment's name (existing mappings stay valid until closed)."""
        host_shm.unlink(self._shm, self._owner)

    def __enter__(self) -> "ReplayMemory":
        return self

    def __exit__(self, *exc) -> None:
        """Close, and unlink when this handle created the memory."""
        self.close()
        if self._owner:
            try:
                self.unlink()
            except FileNotFoundError:
                pass

    def __reduce__(self):
        return (_attach_by_name, (self.name, self.implementation))

    def __repr__(self) -> str:
        lay = self._lay
        return (f"ReplayMemory(name={self.name!r}, capacity={self.capacity}, lanes={lay.lanes}, "
                f"frame_shape={lay.frame_shape}, stack={lay.stack}, dtype={lay.dtype}, "
                f"n_step={lay.n_step}, gamma={lay.gamma}, impl={self.implementation})")


def _attach_by_name(name: str, impl: str) -> ReplayMemory:
    return ReplayMemory.attach(name, impl=None if impl == IMPLEMENTATION else impl)
