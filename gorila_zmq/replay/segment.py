"""The replay memory's shared-memory segment: its layout (lanes, ring sizes, frame and action shapes and
dtypes, the n-step settings), where each array lies in the segment, and the header that records it, so
that a reader attaching by name finds and checks everything without being told."""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"GZREPLAY"
VERSION = 2
HEADER_BYTES = 512
# magic, version, header bytes | lanes, lane capacity, stack, n_step, options | gamma |
# frame dtype, ndim, shape[8] | action dtype, ndim, shape[4] | total bytes
HEAD = struct.Struct("<8sII qqqqq d 16sq8q 16sq4q q")
OPT_REPEAT_PADDING, OPT_FULL_WINDOWS = 1, 2       # the options bits
PADDINGS = ("zeros", "repeat")
_MAX_FRAME_NDIM, _MAX_ACTION_NDIM = 8, 4


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    lanes: int
    lane_capacity: int
    stack: int
    n_step: int
    gamma: float
    frame_shape: tuple
    dtype: np.dtype
    action_shape: tuple
    action_dtype: np.dtype
    stack_padding: str = "zeros"  # frames before an episode's first: "zeros", or "repeat" that first frame
    full_windows: bool = False    # sample only n-step windows of n steps, or cut short by a termination

    @property
    def options(self) -> int:
        return (OPT_REPEAT_PADDING if self.stack_padding == "repeat" else 0) | \
            (OPT_FULL_WINDOWS if self.full_windows else 0)

    @property
    def frame_nbytes(self) -> int:
        return int(np.prod(self.frame_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def action_nbytes(self) -> int:
        return int(np.prod(self.action_shape, dtype=np.int64)) * self.action_dtype.itemsize

    def offsets(self) -> dict[str, int]:
        n = self.lanes * self.lane_capacity
        o = {"writes": HEADER_BYTES, "episodes": HEADER_BYTES + 8 * self.lanes}
        o["frames"] = _align(o["episodes"] + 8 * self.lanes, 4096)
        o["actions"] = _align(o["frames"] + n * self.frame_nbytes, 64)
        o["rewards"] = _align(o["actions"] + n * self.action_nbytes, 64)
        o["flags"] = _align(o["rewards"] + 4 * n, 64)
        o["total"] = o["flags"] + n
        return o

    def pack(self, total: int) -> bytes:
        fs = list(self.frame_shape) + [0] * (_MAX_FRAME_NDIM - len(self.frame_shape))
        acs = list(self.action_shape) + [0] * (_MAX_ACTION_NDIM - len(self.action_shape))
        return HEAD.pack(MAGIC, VERSION, HEADER_BYTES, self.lanes, self.lane_capacity, self.stack,
                          self.n_step, self.options, self.gamma, self.dtype.str.encode(), len(self.frame_shape), *fs,
                          self.action_dtype.str.encode(), len(self.action_shape), *acs, total)

    @staticmethod
    def unpack(raw: bytes, name: str) -> tuple["Layout", int]:
        v = HEAD.unpack_from(raw)
        if v[0] != MAGIC:
            raise ValueError(f"shared memory {name!r} is not a gorila-zmq replay memory "
                             f"(magic {v[0]!r}, or it is still being created)")
        if v[1] != VERSION or v[2] != HEADER_BYTES:
            raise ValueError(f"replay memory {name!r} has layout version {v[1]}, this code reads {VERSION}")
        lanes, lcap, stack, n_step, options, gamma = v[3:9]
        fdt, fnd = v[9], v[10]
        fshape = v[11:11 + _MAX_FRAME_NDIM]
        i = 11 + _MAX_FRAME_NDIM
        adt, and_ = v[i], v[i + 1]
        ashape = v[i + 2:i + 2 + _MAX_ACTION_NDIM]
        total = v[-1]
        try:
            if not (0 <= fnd <= _MAX_FRAME_NDIM and 0 <= and_ <= _MAX_ACTION_NDIM):
                raise ValueError("bad ndim")
            if options & ~(OPT_REPEAT_PADDING | OPT_FULL_WINDOWS):
                raise ValueError(f"unknown option bits {options:#x}")
            lay = Layout(lanes, lcap, stack, n_step, gamma, tuple(fshape[:fnd]),
                          check_dtype(fdt.rstrip(b"\0").decode()), tuple(ashape[:and_]),
                          check_dtype(adt.rstrip(b"\0").decode()),
                          PADDINGS[options & OPT_REPEAT_PADDING], bool(options & OPT_FULL_WINDOWS))
            validate_params(lay)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"replay memory {name!r} has a corrupt header: {e}") from None
        return lay, total


def check_dtype(dt) -> np.dtype:
    d = np.dtype(dt)
    if d.kind not in "biuf" or d.hasobject:
        raise ValueError(f"dtype must be a plain numeric dtype, got {d}")
    return d


def validate_params(lay: Layout) -> None:
    if lay.lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lay.lanes}")
    if lay.stack < 1 or lay.n_step < 1:
        raise ValueError(f"stack and n_step must be >= 1, got stack={lay.stack}, n_step={lay.n_step}")
    if lay.lane_capacity < lay.n_step + 2:
        raise ValueError(f"each lane needs at least n_step + 2 = {lay.n_step + 2} slots "
                         f"(capacity // lanes is {lay.lane_capacity})")
    if not (0.0 <= lay.gamma <= 1.0) or math.isnan(lay.gamma):
        raise ValueError(f"gamma must be in [0, 1], got {lay.gamma}")
    for what, shape, mx in (("frame_shape", lay.frame_shape, _MAX_FRAME_NDIM),
                            ("action_shape", lay.action_shape, _MAX_ACTION_NDIM)):
        if len(shape) > mx or any(int(s) < 1 for s in shape):
            raise ValueError(f"{what} must have at most {mx} positive dims, got {shape}")
    if lay.frame_nbytes < 1:
        raise ValueError("frames must not be empty")
    if lay.stack_padding not in PADDINGS:
        raise ValueError(f"stack_padding must be one of {', '.join(PADDINGS)}, got {lay.stack_padding!r}")
