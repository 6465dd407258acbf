"""Frame preprocessing: parity with OpenCV (within 1 grey level), exactness, both implementations."""
from __future__ import annotations

import functools
import threading
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gorila_zmq.envs import frame
from gorila_zmq._native import try_load_ext

cv2 = pytest.importorskip("cv2")
ale_py = pytest.importorskip("ale_py")

BUILT = try_load_ext("frame") is not None
needs_ext = pytest.mark.skipif(not BUILT, reason="compiled frame kernel not built")
GAMES = ("pong", "breakout", "space_invaders", "ms_pacman", "seaquest")


def _kernel_gray(a, b, out):
    frame._kernel(a.shape, out.shape).max_resize(a, b, out)
    return out


def _kernel_rgb(a, b, out):
    frame._kernel(a.shape[:2], out.shape).max_resize_rgb(a, b, out)
    return out


# (gray, rgb) implementations of one API: the compiled kernel called directly (also in pure-Python
# mode, when built), the public wrapper (whichever implementation is active), the NumPy twin.
IMPLS = [
    pytest.param((_kernel_gray, _kernel_rgb), id="cython", marks=needs_ext),
    pytest.param((frame.max_resize, frame.max_resize_rgb), id="wrapper"),
    pytest.param((frame.max_resize_numpy, frame.max_resize_rgb_numpy), id="numpy"),
]


@pytest.fixture(scope="module")
def real_frames():
    """{game: [(gray_a, gray_b, rgb_a, rgb_b)]}: consecutive screens from seeded random play."""
    from ale_py import roms
    rng = np.random.default_rng(1)
    frames = {}
    for game in GAMES:
        ale = ale_py.ALEInterface()
        ale.setLoggerMode(ale_py.LoggerMode.Error)
        ale.setInt("random_seed", 7)
        ale.setFloat("repeat_action_probability", 0.0)
        ale.loadROM(str(roms.get_rom_path(game)))
        acts = ale.getMinimalActionSet()
        pairs = []
        for _ in range(5):
            for _ in range(int(rng.integers(10, 60))):
                ale.act(acts[int(rng.integers(len(acts)))])
            a, ra = ale.getScreenGrayscale(), ale.getScreenRGB()
            ale.act(acts[int(rng.integers(len(acts)))])
            pairs.append((a, ale.getScreenGrayscale(), ra, ale.getScreenRGB()))
        frames[game] = pairs
    return frames


def cv2_gray(a, b, size=(84, 84)):
    return cv2.resize(np.maximum(a, b), (size[1], size[0]), interpolation=cv2.INTER_AREA)


def cv2_rgb(a, b, size=(84, 84)):
    g = cv2.cvtColor(np.maximum(a, b), cv2.COLOR_RGB2GRAY)
    return cv2.resize(g, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def _exact_weights(src: int, dst: int) -> list[list[Fraction]]:
    """INTER_AREA weights from the definition (overlap / cell width), with exact fractions."""
    s = Fraction(src, dst)
    w = [[Fraction(0)] * src for _ in range(dst)]
    for d in range(dst):
        lo_cell, hi_cell = d * s, (d + 1) * s
        for x in range(int(lo_cell), min(src, int(hi_cell) + 1)):
            ov = min(Fraction(x + 1), hi_cell) - max(Fraction(x), lo_cell)
            if ov > 0:
                w[d][x] = ov / s
    return w


@functools.lru_cache(maxsize=None)
def _integer_weights(src: tuple[int, int], dst: tuple[int, int]):
    wy = _exact_weights(src[0], dst[0])
    wx = _exact_weights(src[1], dst[1])
    den = int(np.lcm.reduce([f.denominator for row in wy + wx for f in row]))
    iy = np.array([[int(f * den) for f in row] for row in wy], dtype=np.int64)
    ix = np.array([[int(f * den) for f in row] for row in wx], dtype=np.int64)
    return iy, ix, den


def exact_area(m: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """(round-half-up of the exact area average, mask of exact ties) for a 2-D uint8 image."""
    iy, ix, den = _integer_weights(m.shape, tuple(size))
    s = iy @ m.astype(np.int64) @ ix.T                      # value * den**2
    d2 = den ** 2
    return (2 * s + d2) // (2 * d2), (2 * s) % (2 * d2) == d2


def _check_against_cv2(ours, ref, exact=None, ties=None):
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()} at {np.argwhere(diff > 1)[:5].tolist()}"
    if exact is not None:
        np.testing.assert_array_equal(ours, exact)
        # OpenCV sums in float32: only exact ties may round the other way
        assert not (diff.astype(bool) & ~ties).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_gray_matches_cv2_on_real_frames(impl, real_frames):
    gray, _ = impl
    for game, pairs in real_frames.items():
        for a, b, _, _ in pairs:
            ours = gray(a, b, np.empty((84, 84), np.uint8))
            exact, ties = exact_area(np.maximum(a, b), (84, 84))
            _check_against_cv2(ours, cv2_gray(a, b), exact, ties)


@pytest.mark.parametrize("impl", IMPLS)
def test_rgb_matches_cv2_on_real_frames(impl, real_frames):
    _, rgb = impl
    for game, pairs in real_frames.items():
        for _, _, ra, rb in pairs:
            ours = rgb(ra, rb, np.empty((84, 84), np.uint8))
            ref = cv2_rgb(ra, rb)
            lum = cv2.cvtColor(np.maximum(ra, rb), cv2.COLOR_RGB2GRAY)
            exact, ties = exact_area(lum, (84, 84))
            _check_against_cv2(ours, ref, exact, ties)


@pytest.mark.parametrize("impl", IMPLS)
def test_noise_frames(impl):
    gray, rgb = impl
    rng = np.random.default_rng(3)
    for trial in range(6):
        a, b = rng.integers(0, 256, (2, 210, 160), dtype=np.uint8)
        if trial % 2:                           # coarse levels make exact ties common
            a, b = a // 51 * 51, b // 51 * 51
        exact, ties = exact_area(np.maximum(a, b), (84, 84))
        _check_against_cv2(gray(a, b, np.empty((84, 84), np.uint8)), cv2_gray(a, b), exact, ties)
        ra, rb = rng.integers(0, 256, (2, 210, 160, 3), dtype=np.uint8)
        _check_against_cv2(rgb(ra, rb, np.empty((84, 84), np.uint8)), cv2_rgb(ra, rb))
    # extremes: the uint16 sums and the multiply-high division at their largest
    for v in (0, 1, 254, 255):
        a = np.full((210, 160), v, np.uint8)
        assert (gray(a, a, np.empty((84, 84), np.uint8)) == v).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("src,dst", [((210, 160), (105, 80)), ((250, 170), (100, 68)),
                                     ((64, 48), (64, 48)), ((37, 21), (5, 7))])
def test_other_geometries(impl, src, dst):
    gray, _ = impl
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 256, (2, *src), dtype=np.uint8)
    ours = gray(a, b, np.empty(dst, np.uint8))
    exact, ties = exact_area(np.maximum(a, b), dst)
    _check_against_cv2(ours, cv2_gray(a, b, dst), exact, ties)


def test_implementations_agree_bit_for_bit(real_frames):
    if not BUILT:
        pytest.skip("compiled frame kernel not built")
    for pairs in real_frames.values():
        for a, b, ra, rb in pairs:
            o = np.empty((84, 84), np.uint8)
            np.testing.assert_array_equal(_kernel_gray(a, b, o), frame.max_resize_numpy(a, b))
            np.testing.assert_array_equal(_kernel_rgb(ra, rb, o), frame.max_resize_rgb_numpy(ra, rb))


def test_tables_and_divider():
    t = frame.area_tables((210, 160), (84, 84))
    assert t.den == 200 and (t.py, t.px) == (5, 40) and t.yw.shape == (84, 3) and t.xw.shape == (84, 3)
    assert (t.wy.sum(1) == 5).all() and (t.wx.sum(1) == 40).all()
    v = np.arange(200 * 255 + 101, dtype=np.uint64)
    np.testing.assert_array_equal((((v >> t.pre) * t.mul) >> 16) >> t.shift, v // 200)
    wide = frame.area_tables((210, 160), (64, 64))    # fifths x 105ths: too fine for 16 bits ...
    assert wide.wide and wide.den == 105 * 5 and wide.yw.dtype == np.uint32   # ... so 32-bit NumPy sums
    assert not t.wide
    with pytest.raises(ValueError, match="downscale"):
        frame.area_tables((84, 84), (210, 160))


@pytest.mark.parametrize("impl", IMPLS)
def test_output_into_a_stack_slot_and_validation(impl):
    gray, rgb = impl
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 256, (2, 210, 160), dtype=np.uint8)
    ring = np.zeros((4, 84, 84), np.uint8)
    gray(a, b, ring[2])
    np.testing.assert_array_equal(ring[2], frame.max_resize_numpy(a, b))
    assert not ring[[0, 1, 3]].any()
    with pytest.raises(ValueError):
        gray(a.astype(np.int16), b, ring[0])
    with pytest.raises(ValueError):
        gray(a, b[:200], ring[0])
    with pytest.raises(ValueError):
        rgb(a, b, ring[0])


def test_wrapper_validation():
    a = np.zeros((210, 160), np.uint8)
    out = np.zeros((84, 84), np.uint8)
    with pytest.raises(ValueError):
        frame.max_resize(a.astype(np.float32), a, out)
    with pytest.raises(ValueError):
        frame.max_resize(a, a[:, :100], out)
    with pytest.raises(ValueError):
        frame.max_resize_rgb(a, a, out)
    out.flags.writeable = False
    with pytest.raises(ValueError):
        frame.max_resize(a, a, out)
    assert frame.max_resize(a, a).shape == (84, 84)
    assert frame.max_resize(a, a, size=(105, 80)).shape == (105, 80)


@needs_ext
def test_kernel_shape_checks():
    k = frame._kernel((210, 160), (84, 84))
    a = np.zeros((210, 160), np.uint8)
    with pytest.raises(ValueError):
        k.max_resize(a, a, np.zeros((84, 83), np.uint8))
    with pytest.raises(ValueError):
        k.max_resize(a, np.zeros((200, 160), np.uint8), np.zeros((84, 84), np.uint8))


@needs_ext
def test_kernel_rejects_tables_that_leave_the_frame():
    t = frame.area_tables((210, 160), (84, 84))
    ext = try_load_ext("frame")
    bad_x0 = t.x0.copy()
    bad_x0[-1] = 159                                    # 3 taps from 159 would read column 161
    for args in ((t.y0, t.yw, bad_x0, t.xw), (t.y0[:-1], t.yw, t.x0, t.xw)):
        with pytest.raises(ValueError):
            ext.AreaKernel(210, 160, 84, 84, *args, 100, t.pre, t.mul, t.shift)


@settings(max_examples=40, deadline=None)
@given(ih=st.integers(1, 70), iw=st.integers(1, 90), fy=st.floats(0.05, 1.0),
       fx=st.floats(0.05, 1.0), seed=st.integers(0, 2**32 - 1))
def test_any_supported_geometry_property(ih, iw, fy, fx, seed):
    """Random sizes exercise the generic paths (tap counts other than 3, widths off multiples of 8)."""
    oh, ow = max(1, round(ih * fy)), max(1, round(iw * fx))
    try:
        wide = frame.area_tables((ih, iw), (oh, ow)).wide   # too fine for 16 bits: NumPy, 32-bit lanes
    except ValueError:
        assume(False)                                   # too fine even for 32 bits
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 256, (2, ih, iw), dtype=np.uint8)
    exact, ties = exact_area(np.maximum(a, b), (oh, ow))
    ours = frame.max_resize_numpy(a, b, size=(oh, ow))
    _check_against_cv2(ours, cv2_gray(a, b, (oh, ow)), exact, ties)
    if BUILT and not wide:
        np.testing.assert_array_equal(_kernel_gray(a, b, np.empty((oh, ow), np.uint8)), ours)
    np.testing.assert_array_equal(frame.max_resize(a, b, size=(oh, ow)), ours)   # the public API, either way


@needs_ext
def test_kernel_is_thread_safe():
    rng = np.random.default_rng(6)
    pairs = [rng.integers(0, 256, (2, 210, 160), dtype=np.uint8) for _ in range(4)]
    want = [frame.max_resize_numpy(a, b) for a, b in pairs]
    errors = []

    def work(i):
        out = np.empty((84, 84), np.uint8)
        for _ in range(300):
            _kernel_gray(pairs[i][0], pairs[i][1], out)
            if not np.array_equal(out, want[i]):
                errors.append(i)
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("impl", [pytest.param("cython", marks=needs_ext), "numpy"])
@pytest.mark.parametrize("rgb", [False, True])
def test_frame_stack_order_and_views(impl, rgb):
    fs = frame.FrameStack((210, 160), 84, k=4, rgb=rgb, impl=impl)
    rng = np.random.default_rng(8)
    shape = fs.prev.shape
    ref = frame.max_resize_rgb_numpy if rgb else frame.max_resize_numpy
    pushed = []
    for i in range(7):
        fs.prev[...] = rng.integers(0, 256, shape, dtype=np.uint8)
        fs.last[...] = rng.integers(0, 256, shape, dtype=np.uint8)
        pooled = i % 3 != 0
        fs.push(pooled)
        pushed.append(ref(fs.prev, fs.last) if pooled else ref(fs.last, fs.last))
        np.testing.assert_array_equal(fs.newest, pushed[-1])
        if i == 0:
            fs.fill()
            pushed = pushed[-1:] * 4
        st = fs.stack
        assert st.shape == (4, 84, 84) and st.flags.c_contiguous and not st.flags.writeable
        np.testing.assert_array_equal(st, np.stack(pushed[-4:]))      # oldest -> newest
    with pytest.raises(ValueError):
        fs.stack[0, 0, 0] = 1
