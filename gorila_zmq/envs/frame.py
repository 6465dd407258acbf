"""Atari frame preprocessing: max over the last two raw frames, luminance, INTER_AREA resize, stack.

Reference semantics (what tests/test_frame.py holds it to): ``cv2.resize(np.maximum(a, b), (84, 84),
interpolation=cv2.INTER_AREA)`` for grayscale screens, and for RGB screens the Nature order
``cv2.resize(cv2.cvtColor(np.maximum(a, b), cv2.COLOR_RGB2GRAY), ...)``; every output pixel is
within 1 grey level of OpenCV's.

Exact integer arithmetic: OpenCV's area weights for a downscale by ``s/d`` are multiples of ``1/p``
with ``p = s / gcd(s, d)`` (210 -> 84 in fifths, 160 -> 84 in fortieths), so the resize is
``round(sum(wy * wx * pixel) / (py * px))`` with small integer weights. OpenCV computes the same
sum in float32 and rounds half to even, so only exact ties (sum = k + 1/2, about 0.5% of pixels
on noise) can come out one grey level apart.

Geometries whose denominator does not fit 16-bit lanes (Atari screens of 214, 220, 230 or 250 rows:
250 -> 84 is in 125ths) use the same exact weights in 32-bit lanes, in NumPy, under either
implementation (``AreaTables.wide``).

Two implementations of one API: the fused Cython kernel (gorila_zmq._ext.frame) and a NumPy
version with the same integer weights (banded uint16 sums), chosen by ``GORILA_PUREPYTHON=1``;
they agree bit for bit. ``FrameStack`` is what the Atari environment uses: screen buffers and a
frame-stack ring bound to the kernel once, one call per agent step.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from gorila_zmq._native import load_ext, try_load_ext

_ext = load_ext("frame")

IMPLEMENTATION = "numpy" if _ext is None else "cython"

# cv2.COLOR_RGB2GRAY on uint8 as OpenCV 5 computes it (bit-exact with it over all 2**24 colours):
# (9798 R + 19235 G + 3735 B + 2**14) >> 15, i.e. 0.299 / 0.587 / 0.114 in 15-bit fixed point.
# ext/frame.pyx uses the same constants.
LUMA_WEIGHTS = (9798, 19235, 3735)
LUMA_SHIFT = 15


def _shape2(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def area_weights(src: int, dst: int) -> tuple[np.ndarray, int]:
    """Integer numerators (dst, src) of OpenCV's INTER_AREA weights along one axis, and their
    common denominator p: output d covers [d*s/dst, (d+1)*s/dst) and takes from source pixel x the
    length of its overlap with [x, x+1) divided by the cell width, which is (integer) / p.
    (OpenCV drops overlaps under 1e-3 pixel, which only exist when p > 1000.)"""
    if not 0 < dst <= src:
        raise ValueError(f"area resize only downscales: {src} -> {dst}")
    g = math.gcd(src, dst)
    p, q = src // g, dst // g
    # In units of 1/q source pixels: cell d is [d*p, (d+1)*p), pixel x is [x*q, (x+1)*q).
    d = np.arange(dst)[:, None]
    x = np.arange(src)[None, :]
    lo = np.maximum(d * p, x * q)
    hi = np.minimum((d + 1) * p, (x + 1) * q)
    return np.maximum(hi - lo, 0).astype(np.int64), p


def _taps(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Banded form of a weight matrix: first source index and a fixed number of weights per row."""
    dst, src = w.shape
    nz = [np.flatnonzero(r) for r in w]
    t = max(int(z[-1] - z[0] + 1) for z in nz)
    first = np.array([min(int(z[0]), src - t) for z in nz], dtype=np.int32)
    taps = np.stack([w[i, first[i]:first[i] + t] for i in range(dst)]).astype(np.uint16)
    return first, np.ascontiguousarray(taps)


def _divider(den: int, vmax: int) -> tuple[int, int, int]:
    """(pre, mul, shift) with ((v >> pre) * mul >> 16) >> shift == v // den for 0 <= v <= vmax,
    all in uint16 lanes (checked exhaustively). den >= 2."""
    v = np.arange(vmax + 1, dtype=np.uint64)
    want = v // den
    pre = (den & -den).bit_length() - 1          # the power of two in den is a plain shift
    odd = den >> pre
    if odd == 1:                                 # a power of two: mul = 2**16 would not fit
        candidates = [(pre - 1, 1 << 15, 0)]
    else:
        candidates = [(pre, -(-(1 << (16 + s)) // odd), s) for s in range(16)]
    for pre_, mul, shift in candidates:
        if mul < 1 << 16 and np.array_equal((((v >> pre_) * mul) >> 16) >> shift, want):
            return pre_, mul, shift
    raise ValueError(f"no uint16 multiply-high divides by {den}")


@dataclass(frozen=True)
class AreaTables:
    """Everything one (in_h, in_w) -> (out_h, out_w) resize needs, for both implementations:
    out = (sum_k yw * sum_j xw * pixel + den // 2) // den over the banded taps."""
    in_shape: tuple[int, int]
    out_shape: tuple[int, int]
    wy: np.ndarray          # (out_h, in_h) integer numerators of the vertical weights, over py
    wx: np.ndarray          # (out_w, in_w) the horizontal ones, over px
    py: int
    px: int
    y0: np.ndarray          # banded forms: first source index per output, and its taps' weights
    yw: np.ndarray
    x0: np.ndarray
    xw: np.ndarray
    den: int                # py * px (doubled, with yw, when it is 1: the divider needs den >= 2)
    wide: bool              # den too large for 16-bit lanes: 32-bit NumPy sums, no compiled kernel
    pre: int                # v // den == ((v >> pre) * mul >> 16) >> shift in uint16 lanes
    mul: int
    shift: int


@functools.lru_cache(maxsize=16)
def area_tables(in_shape, out_shape) -> AreaTables:
    (ih, iw), (oh, ow) = _shape2(in_shape), _shape2(out_shape)
    wy, py = area_weights(ih, oh)
    wx, px = area_weights(iw, ow)
    y0, yw = _taps(wy)
    x0, xw = _taps(wx)
    den = py * px
    if den == 1:                                # an identity resize
        den, yw = 2, yw * 2
    wide = den * 255 + den // 2 >= 1 << 16
    if wide:
        if den * 255 + den // 2 >= 1 << 32:
            raise ValueError(f"{ih}x{iw} -> {oh}x{ow}: exact area weights need denominator {py}*{px} = {den}, "
                             "too large even for 32-bit sums; pick sizes with a larger common divisor")
        yw, xw, (pre, mul, shift) = yw.astype(np.uint32), xw.astype(np.uint32), (0, 0, 0)
    else:
        pre, mul, shift = _divider(den, den * 255 + den // 2)
    for a in (wy, wx, y0, yw, x0, xw):
        a.setflags(write=False)
    return AreaTables((ih, iw), (oh, ow), wy, wx, py, px, y0, yw, x0, xw, den, wide, pre, mul, shift)


@functools.lru_cache(maxsize=16)
def _kernel(in_shape: tuple[int, int], out_shape: tuple[int, int]):
    """The compiled kernel for one geometry (immutable tables: safe to share between threads).
    Loaded even in pure-Python mode when built, so benchmarks can compare both."""
    ext = _ext or try_load_ext("frame")
    if ext is None:
        raise ImportError("the compiled frame kernel is not built (make build)")
    t = area_tables(in_shape, out_shape)
    if t.wide:
        raise ValueError(f"{t.in_shape} -> {t.out_shape} needs 32-bit lanes: the NumPy path, not the kernel")
    return ext.AreaKernel(t.in_shape[0], t.in_shape[1], t.out_shape[0], t.out_shape[1],
                          t.y0, t.yw, t.x0, t.xw, t.den // 2, t.pre, t.mul, t.shift)


# -- NumPy implementation ---------------------------------------------------------------------

def luminance(rgb: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) for uint8 (..., 3) arrays, bit for bit."""
    r, g, b = LUMA_WEIGHTS
    x = rgb.astype(np.uint32)
    y = x[..., 0] * r + x[..., 1] * g + x[..., 2] * b + (1 << (LUMA_SHIFT - 1))
    return (y >> LUMA_SHIFT).astype(np.uint8)


def _resize_numpy(m: np.ndarray, t: AreaTables, out: np.ndarray) -> np.ndarray:
    # The kernel's arithmetic with whole-array ops: banded sums in uint16 (den * 255 + den // 2
    # < 2**16, checked by area_tables) or uint32 (wide tables), then the rounded division.
    v = m[t.y0] * t.yw[:, 0:1]                            # (out_h, in_w)
    for k in range(1, t.yw.shape[1]):
        v += m[t.y0 + k] * t.yw[:, k:k + 1]
    s = v[:, t.x0] * t.xw[:, 0]                           # (out_h, out_w)
    for k in range(1, t.xw.shape[1]):
        s += v[:, t.x0 + k] * t.xw[:, k]
    s += t.den // 2
    s //= t.den
    out[...] = s
    return out


def max_resize_numpy(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None,
                     size=(84, 84)) -> np.ndarray:
    """NumPy twin of max_resize (same arguments, same result)."""
    out = _check(a, b, out, size, rgb=False)
    return _resize_numpy(np.maximum(a, b), area_tables(a.shape, out.shape), out)


def max_resize_rgb_numpy(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None,
                         size=(84, 84)) -> np.ndarray:
    """NumPy twin of max_resize_rgb (same arguments, same result)."""
    out = _check(a, b, out, size, rgb=True)
    return _resize_numpy(luminance(np.maximum(a, b)), area_tables(a.shape[:2], out.shape), out)


# -- the public, validating API ---------------------------------------------------------------

def _check(a, b, out, size, rgb: bool) -> np.ndarray:
    nd = 3 if rgb else 2
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != nd:
            raise ValueError(f"{name} must be a {nd}-D uint8 array, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        if rgb and x.shape[2] != 3:
            raise ValueError(f"{name} must be (H, W, 3) RGB, got {x.shape}")
    if a.shape != b.shape:
        raise ValueError(f"a and b differ in shape: {a.shape} vs {b.shape}")
    if out is None:
        return np.empty(_shape2(size), dtype=np.uint8)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 2:
        raise ValueError("out must be a 2-D uint8 array")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    return out


def max_resize(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None,
               size=(84, 84)) -> np.ndarray:
    """INTER_AREA resize of max(a, b) for two grayscale uint8 frames, into `out` (its shape is
    the output size; rows may be strided, e.g. a slot of a frame stack) or a new `size` array."""
    out = _check(a, b, out, size, rgb=False)
    if _ext is None or area_tables(a.shape, out.shape).wide:
        return _resize_numpy(np.maximum(a, b), area_tables(a.shape, out.shape), out)
    k = _kernel(a.shape, out.shape)
    k.max_resize(np.ascontiguousarray(a), np.ascontiguousarray(b), _rows_contiguous(out))
    return out


def max_resize_rgb(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None,
                   size=(84, 84)) -> np.ndarray:
    """Nature order for two RGB uint8 frames (H, W, 3): max, then luminance (cv2 RGB2GRAY), then
    the INTER_AREA resize into `out` (or a new `size` array)."""
    out = _check(a, b, out, size, rgb=True)
    if _ext is None or area_tables(a.shape[:2], out.shape).wide:
        return _resize_numpy(luminance(np.maximum(a, b)), area_tables(a.shape[:2], out.shape), out)
    k = _kernel(a.shape[:2], out.shape)
    k.max_resize_rgb(np.ascontiguousarray(a), np.ascontiguousarray(b), _rows_contiguous(out))
    return out


def _rows_contiguous(out: np.ndarray) -> np.ndarray:
    if out.strides[1] != 1:
        raise ValueError("out must have contiguous rows (stride 1 along the last axis)")
    return out


# -- the frame stack the environment writes into ----------------------------------------------

class FrameStack:
    """Screen buffers, the preprocessing, and a ring of the last `k` processed frames.

    The emulator writes its screens into `prev` (second-to-last frame of an agent step) and `last`
    (the last frame); `push()` writes resize(max(prev, last)) (or of `last` alone) as the newest
    frame. The ring is mirrored (frame i at slots i and i + k), so `stack` is always a contiguous
    (k, h, w) view, oldest -> newest, with no copy. `stack` and `newest` are views: they change on
    the next push; copy them to keep them.
    """

    def __init__(self, screen_shape=(210, 160), size=(84, 84), k: int = 4, rgb: bool = False,
                 impl: str | None = None):
        sh, sw = _shape2(screen_shape)
        oh, ow = _shape2(size)
        if k < 1:
            raise ValueError(f"frame stack k must be >= 1, got {k}")
        if impl not in (None, "cython", "numpy"):
            raise ValueError(f"impl must be None, 'cython' or 'numpy', not {impl!r}")
        wide = area_tables((sh, sw), (oh, ow)).wide          # validates the geometry
        self.k, self.rgb = k, rgb
        shape = (sh, sw, 3) if rgb else (sh, sw)
        self._prev = np.zeros(shape, dtype=np.uint8)
        self._last = np.zeros(shape, dtype=np.uint8)
        self._ring = np.zeros((2 * k, oh, ow), dtype=np.uint8)
        self._head = k - 1                                  # slot of the newest frame
        self.impl = "numpy" if wide else impl or IMPLEMENTATION     # wide: 32-bit lanes, NumPy only
        if self.impl == "cython":
            ext = _ext or try_load_ext("frame")
            if ext is None:
                raise ImportError("the compiled frame kernel is not built (make build)")
            writer = ext.StackWriter(_kernel((sh, sw), (oh, ow)), self._prev, self._last, self._ring)
            self._write, self._fill = writer.write, writer.fill
        else:
            self._write, self._fill = self._write_numpy, self._fill_numpy

    @property
    def prev(self) -> np.ndarray:
        """Screen buffer for the second-to-last frame of an agent step (bound to the kernel)."""
        return self._prev

    @property
    def last(self) -> np.ndarray:
        """Screen buffer for the last frame of an agent step (bound to the kernel)."""
        return self._last

    def push(self, pooled: bool = True) -> None:
        """Process the screens into the next slot: max(prev, last) if pooled, else last alone."""
        self._head = (self._head + 1) % self.k
        self._write(self._head, pooled)

    def fill(self) -> None:
        """Make every frame of the stack equal to the newest (the start of an episode)."""
        self._fill(self._head)

    def clear_older(self) -> None:
        """Keep the newest frame, zero the older ones: the start of an episode as the replay memory
        rebuilds it (frames from before an episode's start are zeros, never another episode's)."""
        newest = self._ring[self._head].copy()
        self._ring[:] = 0
        self._ring[self._head] = newest
        self._ring[self._head + self.k] = newest

    @property
    def stack(self) -> np.ndarray:
        """(k, h, w) read-only view, oldest -> newest; changes on the next push."""
        h = self._head + 1
        v = self._ring[h:h + self.k]
        v.flags.writeable = False
        return v

    @property
    def newest(self) -> np.ndarray:
        """(h, w) read-only view of the newest frame; changes k pushes later."""
        v = self._ring[self._head]
        v.flags.writeable = False
        return v

    def _write_numpy(self, slot: int, pooled: bool) -> None:
        dst = self._ring[slot]
        if self.rgb:
            m = luminance(np.maximum(self.prev, self.last) if pooled else self.last)
        else:
            m = np.maximum(self.prev, self.last) if pooled else self.last
        _resize_numpy(m, area_tables(m.shape, dst.shape), dst)
        self._ring[slot + self.k] = dst

    def _fill_numpy(self, slot: int) -> None:
        self._ring[:] = self._ring[slot]

