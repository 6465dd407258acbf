# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused Atari frame preprocessing: max over two raw frames, (luminance,) INTER_AREA resize, nogil.

Wrapped (and validated) by gorila_zmq.envs.frame, which also builds the weight tables; never called
directly. The resize is integer-exact: OpenCV's INTER_AREA weights for a downscale by ssize/dsize are
all multiples of 1/p with p = ssize / gcd(ssize, dsize) (210 -> 84: fifths; 160 -> 84: fortieths),
so out = round(sum(wy * wx * pixel) / (py * px)) with small integer weights, accumulated in uint16
(py * px * 255 < 2**16 is checked by the wrapper) and divided by a multiply-high.

Layout: a vertical pass (contiguous rows, which the compiler vectorises: SSE2, or AVX2 where the
CPU has it) makes 8 output rows at a time at source width; 8x8 transposes turn those into columns
so that the horizontal pass is also 8 lanes wide (SSE2 intrinsics); a transpose back, the
division, and the store. The C helpers sit in the block below (with a plain-C twin where SSE2 is
missing, e.g. aarch64; -DGZ_FRAME_NO_SSE2 builds it on x86 for testing). The tables are immutable
and each call keeps its few KB of scratch on the stack, so one AreaKernel may be shared by threads.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    /* One clone per instruction set, picked at load time, where the toolchain has ifuncs (as
       ext/gz_simd.h does); no -march=native. */
    #if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
    #define GZ_FRAME_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #define GZ_FRAME_CLONES
    #endif

    /* The vertical pass for 3 taps: t = w0 max(pa, pb) + w1 max(qa, qb) + w2 max(za, zb). */
    GZ_FRAME_CLONES static void gz_vpass3_u16(
            const uint8_t *restrict pa, const uint8_t *restrict pb, const uint8_t *restrict qa,
            const uint8_t *restrict qb, const uint8_t *restrict za, const uint8_t *restrict zb,
            uint16_t w0, uint16_t w1, uint16_t w2, uint16_t *restrict t, ptrdiff_t n) {
        for (ptrdiff_t x = 0; x < n; x++) {
            uint8_t p = pa[x] > pb[x] ? pa[x] : pb[x];
            uint8_t q = qa[x] > qb[x] ? qa[x] : qb[x];
            uint8_t z = za[x] > zb[x] ? za[x] : zb[x];
            t[x] = (uint16_t)(w0 * p + w1 * q + w2 * z);
        }
    }

    /* One row of cv2 RGB2GRAY (OpenCV 5's 15-bit weights) of max(a, b); m: 3n bytes of scratch. */
    GZ_FRAME_CLONES static void gz_luma_max_row(
            const uint8_t *restrict a, const uint8_t *restrict b, uint8_t *restrict m,
            uint8_t *restrict g, ptrdiff_t n) {
        for (ptrdiff_t x = 0; x < 3 * n; x++)
            m[x] = a[x] > b[x] ? a[x] : b[x];
        for (ptrdiff_t x = 0; x < n; x++)
            g[x] = (uint8_t)((9798u * m[3 * x] + 19235u * m[3 * x + 1] + 3735u * m[3 * x + 2]
                              + (1u << 14)) >> 15);
    }

    #if (defined(__SSE2__) || defined(_M_X64) || defined(_M_AMD64)) && !defined(GZ_FRAME_NO_SSE2)
    #include <emmintrin.h>
    /* 8x8 transpose of uint16 in 24 unpacks: the one step compilers do not vectorise by themselves. */
    static inline void gz_transpose8x8_u16(const uint16_t *s, ptrdiff_t ss, uint16_t *d, ptrdiff_t ds) {
        __m128i r0 = _mm_loadu_si128((const __m128i *)(s + 0 * ss));
        __m128i r1 = _mm_loadu_si128((const __m128i *)(s + 1 * ss));
        __m128i r2 = _mm_loadu_si128((const __m128i *)(s + 2 * ss));
        __m128i r3 = _mm_loadu_si128((const __m128i *)(s + 3 * ss));
        __m128i r4 = _mm_loadu_si128((const __m128i *)(s + 4 * ss));
        __m128i r5 = _mm_loadu_si128((const __m128i *)(s + 5 * ss));
        __m128i r6 = _mm_loadu_si128((const __m128i *)(s + 6 * ss));
        __m128i r7 = _mm_loadu_si128((const __m128i *)(s + 7 * ss));
        __m128i t0 = _mm_unpacklo_epi16(r0, r1), t1 = _mm_unpackhi_epi16(r0, r1);
        __m128i t2 = _mm_unpacklo_epi16(r2, r3), t3 = _mm_unpackhi_epi16(r2, r3);
        __m128i t4 = _mm_unpacklo_epi16(r4, r5), t5 = _mm_unpackhi_epi16(r4, r5);
        __m128i t6 = _mm_unpacklo_epi16(r6, r7), t7 = _mm_unpackhi_epi16(r6, r7);
        __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
        __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
        __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
        __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
        _mm_storeu_si128((__m128i *)(d + 0 * ds), _mm_unpacklo_epi64(u0, u4));
        _mm_storeu_si128((__m128i *)(d + 1 * ds), _mm_unpackhi_epi64(u0, u4));
        _mm_storeu_si128((__m128i *)(d + 2 * ds), _mm_unpacklo_epi64(u1, u5));
        _mm_storeu_si128((__m128i *)(d + 3 * ds), _mm_unpackhi_epi64(u1, u5));
        _mm_storeu_si128((__m128i *)(d + 4 * ds), _mm_unpacklo_epi64(u2, u6));
        _mm_storeu_si128((__m128i *)(d + 5 * ds), _mm_unpackhi_epi64(u2, u6));
        _mm_storeu_si128((__m128i *)(d + 6 * ds), _mm_unpacklo_epi64(u3, u7));
        _mm_storeu_si128((__m128i *)(d + 7 * ds), _mm_unpackhi_epi64(u3, u7));
    }
    /* d[r] = (half + sum_k w8[8k + r] * c[8k + r]) / den for r < 8 (w8: each weight repeated 8
       times), the division as ((v >> pre) * mul) >> 16 >> shift, exact for every v that occurs. */
    static inline void gz_taps8_u16(const uint16_t *c, const uint16_t *w8, int taps, uint16_t half,
                                    int pre, uint16_t mul, int shift, uint16_t *d) {
        __m128i v = _mm_set1_epi16((short)half);
        if (taps == 3) {    /* 160 -> 84: unrolled */
            v = _mm_add_epi16(v, _mm_mullo_epi16(_mm_loadu_si128((const __m128i *)c),
                                                 _mm_loadu_si128((const __m128i *)w8)));
            v = _mm_add_epi16(v, _mm_mullo_epi16(_mm_loadu_si128((const __m128i *)(c + 8)),
                                                 _mm_loadu_si128((const __m128i *)(w8 + 8))));
            v = _mm_add_epi16(v, _mm_mullo_epi16(_mm_loadu_si128((const __m128i *)(c + 16)),
                                                 _mm_loadu_si128((const __m128i *)(w8 + 16))));
        } else {
            for (int k = 0; k < taps; k++)
                v = _mm_add_epi16(v, _mm_mullo_epi16(_mm_loadu_si128((const __m128i *)(c + 8 * k)),
                                                     _mm_loadu_si128((const __m128i *)(w8 + 8 * k))));
        }
        v = _mm_srl_epi16(v, _mm_cvtsi32_si128(pre));
        v = _mm_mulhi_epu16(v, _mm_set1_epi16((short)mul));
        v = _mm_srl_epi16(v, _mm_cvtsi32_si128(shift));
        _mm_storeu_si128((__m128i *)d, v);
    }
    #define GZ_FRAME_SIMD "sse2"
    #else
    static inline void gz_transpose8x8_u16(const uint16_t *s, ptrdiff_t ss, uint16_t *d, ptrdiff_t ds) {
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < 8; j++)
                d[j * ds + i] = s[i * ss + j];
    }
    static inline void gz_taps8_u16(const uint16_t *c, const uint16_t *w8, int taps, uint16_t half,
                                    int pre, uint16_t mul, int shift, uint16_t *d) {
        for (int r = 0; r < 8; r++) {
            uint16_t v = half;
            for (int k = 0; k < taps; k++)
                v = (uint16_t)(v + w8[8 * k + r] * c[8 * k + r]);
            d[r] = (uint16_t)((((uint32_t)(v >> pre) * mul) >> 16) >> shift);
        }
    }
    #define GZ_FRAME_SIMD "none"
    #endif
    """
    void transpose8x8_u16 "gz_transpose8x8_u16"(const uint16_t* s, Py_ssize_t ss,
                                                 uint16_t* d, Py_ssize_t ds) noexcept nogil
    void taps8_u16 "gz_taps8_u16"(const uint16_t* c, const uint16_t* w8, int taps, uint16_t half,
                                  int pre, uint16_t mul, int shift, uint16_t* d) noexcept nogil
    const char* GZ_FRAME_SIMD
    void vpass3_u16 "gz_vpass3_u16"(const uint8_t* pa, const uint8_t* pb, const uint8_t* qa,
                                    const uint8_t* qb, const uint8_t* za, const uint8_t* zb,
                                    uint16_t w0, uint16_t w1, uint16_t w2, uint16_t* t,
                                    Py_ssize_t n) noexcept nogil
    void luma_max_row "gz_luma_max_row"(const uint8_t* a, const uint8_t* b, uint8_t* m, uint8_t* g,
                                        Py_ssize_t n) noexcept nogil

SIMD = GZ_FRAME_SIMD.decode()

# uint16 scratch per call (on the stack): 16 * (pad8(in_w) + pad8(out_w)) = 3,968 for 160 -> 84.
cdef enum:
    SCRATCH = 8192


cdef inline uint8_t umax(uint8_t a, uint8_t b) noexcept nogil:
    return a if a > b else b


cdef inline Py_ssize_t pad8(Py_ssize_t n) noexcept nogil:
    return (n + 7) & ~7


cdef void luminance_max(const uint8_t* a, Py_ssize_t sa, const uint8_t* b, Py_ssize_t sb,
                        uint8_t* gray, uint8_t* row, Py_ssize_t h, Py_ssize_t w) noexcept nogil:
    """gray (h x w, contiguous) = cv2 RGB2GRAY of max(a, b); a, b (h x w x 3), row strides sa, sb;
    row: 3w bytes of scratch."""
    cdef Py_ssize_t y
    for y in range(h):
        luma_max_row(a + y * sa, b + y * sb, row, gray + y * w, w)


cdef class AreaKernel:
    """The integer weight tables of one (in_h, in_w) -> (out_h, out_w) resize (immutable)."""
    cdef readonly int in_h, in_w, out_h, out_w
    cdef int ytaps, xtaps, in_wp, out_wp, pre, shift
    cdef uint16_t half, mul
    cdef int32_t* y0
    cdef uint16_t* yw
    cdef int32_t* x0
    cdef uint16_t* xw8      # out_w x xtaps x 8: each horizontal weight repeated for the 8 lanes

    def __cinit__(self, int in_h, int in_w, int out_h, int out_w,
                  const int32_t[::1] y0, const uint16_t[:, ::1] yw,
                  const int32_t[::1] x0, const uint16_t[:, ::1] xw,
                  int half, int pre, int mul, int shift):
        cdef Py_ssize_t i
        if y0.shape[0] != out_h or yw.shape[0] != out_h or x0.shape[0] != out_w or xw.shape[0] != out_w:
            raise ValueError("weight tables do not match the output size")
        for i in range(out_h):      # the kernel trusts the tables: no read may leave the frame
            if y0[i] < 0 or y0[i] + yw.shape[1] > in_h:
                raise ValueError(f"vertical taps of row {i} leave the frame")
        for i in range(out_w):
            if x0[i] < 0 or x0[i] + xw.shape[1] > in_w:
                raise ValueError(f"horizontal taps of column {i} leave the frame")
        self.in_h, self.in_w, self.out_h, self.out_w = in_h, in_w, out_h, out_w
        self.ytaps, self.xtaps = yw.shape[1], xw.shape[1]
        self.in_wp, self.out_wp = pad8(in_w), pad8(out_w)
        self.half, self.pre, self.mul, self.shift = half, pre, mul, shift
        self.y0 = <int32_t*> calloc(out_h, sizeof(int32_t))
        self.yw = <uint16_t*> calloc(out_h * self.ytaps, sizeof(uint16_t))
        self.x0 = <int32_t*> calloc(out_w, sizeof(int32_t))
        self.xw8 = <uint16_t*> calloc(out_w * self.xtaps * 8, sizeof(uint16_t))
        if not self.y0 or not self.yw or not self.x0 or not self.xw8:
            raise MemoryError()
        if 16 * (self.in_wp + self.out_wp) > SCRATCH:
            raise ValueError(f"frames {in_w} and {out_w} wide need more than {SCRATCH} scratch")
        memcpy(self.y0, &y0[0], out_h * sizeof(int32_t))
        memcpy(self.yw, &yw[0, 0], out_h * self.ytaps * sizeof(uint16_t))
        memcpy(self.x0, &x0[0], out_w * sizeof(int32_t))
        for i in range(out_w * self.xtaps * 8):
            self.xw8[i] = xw[i // (8 * self.xtaps), (i // 8) % self.xtaps]

    def __dealloc__(self):
        free(self.y0); free(self.yw); free(self.x0); free(self.xw8)

    cdef void run(self, const uint8_t* a, Py_ssize_t sa, const uint8_t* b, Py_ssize_t sb,
                  uint8_t* out, Py_ssize_t so) noexcept nogil:
        """out (out_h x out_w, row stride so) = area resize of max(a, b) (in_h x in_w, row strides
        sa, sb)."""
        cdef Py_ssize_t iw = self.in_w, iwp = self.in_wp, ow = self.out_w, owp = self.out_wp
        cdef Py_ssize_t yt = self.ytaps, xt = self.xtaps
        cdef Py_ssize_t yb, n, r, dy, sy, k, x, dx
        cdef uint16_t w, w0, w1, w2
        cdef uint16_t* t
        cdef const uint8_t* pa
        cdef const uint8_t* pb
        cdef const uint8_t* qa
        cdef const uint8_t* qb
        cdef const uint8_t* za
        cdef const uint8_t* zb
        cdef uint8_t* o
        cdef uint16_t half = self.half, mul = self.mul
        cdef int pre = self.pre, shift = self.shift
        # scratch on the stack: rows (8 x iwp) is the vertical pass for 8 output rows, cols
        # (iwp x 8) the same transposed, ocols (owp x 8) the horizontal pass, orows (8 x owp) that
        # transposed back. Zeroed so that padding lanes are defined; they never reach `out`.
        cdef uint16_t scratch[SCRATCH]
        cdef uint16_t* rows = scratch
        memset(scratch, 0, 16 * (iwp + owp) * sizeof(uint16_t))
        cdef uint16_t* cols = rows + 8 * iwp
        cdef uint16_t* ocols = cols + 8 * iwp
        cdef uint16_t* orows = ocols + 8 * owp
        for yb in range(0, self.out_h, 8):
            n = min(8, self.out_h - yb)
            # vertical pass: rows[r, x] = sum_k yw[dy, k] * max(a, b)[y0[dy] + k, x]
            for r in range(n):
                dy = yb + r
                t = rows + r * iwp
                sy = self.y0[dy]
                pa = a + sy * sa
                pb = b + sy * sb
                if yt == 3:     # 210 -> 84: the case that matters, kept in registers
                    w0 = self.yw[dy * 3]
                    w1 = self.yw[dy * 3 + 1]
                    w2 = self.yw[dy * 3 + 2]
                    qa = pa + sa
                    qb = pb + sb
                    za = qa + sa
                    zb = qb + sb
                    vpass3_u16(pa, pb, qa, qb, za, zb, w0, w1, w2, t, iw)
                else:
                    w = self.yw[dy * yt]
                    for x in range(iw):
                        t[x] = w * umax(pa[x], pb[x])
                    for k in range(1, yt):
                        w = self.yw[dy * yt + k]
                        pa = pa + sa
                        pb = pb + sb
                        for x in range(iw):
                            t[x] = t[x] + w * umax(pa[x], pb[x])
            for x in range(0, iwp, 8):
                transpose8x8_u16(rows + x, iwp, cols + x * 8, 8)
            # horizontal pass, 8 output rows per lane group, and the division by py * px:
            # ocols[dx] = (half + sum_k xw[dx, k] * cols[x0[dx] + k]) // den, via
            # (v >> pre) * mul >> 16 >> shift, which equals v // den for every v that can occur
            for dx in range(ow):
                taps8_u16(cols + self.x0[dx] * 8, self.xw8 + dx * xt * 8, xt, half, pre, mul, shift,
                          ocols + dx * 8)
            for dx in range(0, owp, 8):
                transpose8x8_u16(ocols + dx * 8, 8, orows + dx, owp)
            for r in range(n):
                o = out + (yb + r) * so
                t = orows + r * owp
                for dx in range(ow):
                    o[dx] = <uint8_t> t[dx]

    cdef int run_rgb(self, const uint8_t* a, Py_ssize_t sa, const uint8_t* b, Py_ssize_t sb,
                     uint8_t* out, Py_ssize_t so) noexcept nogil:
        """As run(), for RGB frames (row strides sa, sb): luminance of the max, then the resize."""
        cdef uint8_t* gray = <uint8_t*> malloc(self.in_h * self.in_w + 3 * self.in_w)
        if gray == NULL:
            return -1
        luminance_max(a, sa, b, sb, gray, gray + self.in_h * self.in_w, self.in_h, self.in_w)
        self.run(gray, self.in_w, gray, self.in_w, out, so)
        free(gray)
        return 0

    def max_resize(self, const uint8_t[:, ::1] a, const uint8_t[:, ::1] b, uint8_t[:, ::1] out):
        """out = INTER_AREA resize of max(a, b); a, b (in_h, in_w), out (out_h, out_w) uint8."""
        self.check(a.shape[0], a.shape[1], b.shape[0], b.shape[1], out.shape[0], out.shape[1])
        with nogil:
            self.run(&a[0, 0], a.strides[0], &b[0, 0], b.strides[0], &out[0, 0], out.strides[0])

    def max_resize_rgb(self, const uint8_t[:, :, ::1] a, const uint8_t[:, :, ::1] b,
                       uint8_t[:, ::1] out):
        """out = INTER_AREA resize of luminance(max(a, b)); a, b (in_h, in_w, 3), out (out_h, out_w)."""
        self.check(a.shape[0], a.shape[1], b.shape[0], b.shape[1], out.shape[0], out.shape[1])
        if a.shape[2] != 3 or b.shape[2] != 3:
            raise ValueError("RGB frames must have 3 channels")
        cdef int rc
        with nogil:
            rc = self.run_rgb(&a[0, 0, 0], a.strides[0], &b[0, 0, 0], b.strides[0],
                              &out[0, 0], out.strides[0])
        if rc:
            raise MemoryError()

    cdef int check(self, Py_ssize_t ah, Py_ssize_t aw, Py_ssize_t bh, Py_ssize_t bw,
                   Py_ssize_t oh, Py_ssize_t ow) except -1:
        if ah != self.in_h or aw != self.in_w or bh != self.in_h or bw != self.in_w:
            raise ValueError(f"frames must be {self.in_h}x{self.in_w}, got {ah}x{aw} and {bh}x{bw}")
        if oh != self.out_h or ow != self.out_w:
            raise ValueError(f"out must be {self.out_h}x{self.out_w}, got {oh}x{ow}")
        return 0


cdef class StackWriter:
    """The environment's fast path: buffers bound and checked once, one call per agent step.

    `prev` and `last` are the screens of the last two emulator frames (2-D gray or 3-D RGB), `ring`
    a (2K, out_h, out_w) mirrored frame stack: frame i lives at slots i and i + K, so
    ring[s + 1 : s + 1 + K] is always the contiguous oldest -> newest stack ending at slot s.
    """
    cdef AreaKernel kernel
    cdef object keep                # the bound arrays, kept alive while their pointers are held
    cdef const uint8_t* prev
    cdef const uint8_t* last
    cdef Py_ssize_t sprev, slast
    cdef uint8_t* ring
    cdef Py_ssize_t k, frame
    cdef bint rgb

    def __cinit__(self, AreaKernel kernel, prev, last, uint8_t[:, :, ::1] ring):
        cdef const uint8_t[:, ::1] p2
        cdef const uint8_t[:, ::1] l2
        cdef const uint8_t[:, :, ::1] p3
        cdef const uint8_t[:, :, ::1] l3
        self.rgb = prev.ndim == 3
        if self.rgb:
            p3, l3 = prev, last
            kernel.check(p3.shape[0], p3.shape[1], l3.shape[0], l3.shape[1], ring.shape[1], ring.shape[2])
            if p3.shape[2] != 3 or l3.shape[2] != 3:
                raise ValueError("RGB frames must have 3 channels")
            self.prev, self.sprev = &p3[0, 0, 0], p3.strides[0]
            self.last, self.slast = &l3[0, 0, 0], l3.strides[0]
        else:
            p2, l2 = prev, last
            kernel.check(p2.shape[0], p2.shape[1], l2.shape[0], l2.shape[1], ring.shape[1], ring.shape[2])
            self.prev, self.sprev = &p2[0, 0], p2.strides[0]
            self.last, self.slast = &l2[0, 0], l2.strides[0]
        if ring.shape[0] < 2 or ring.shape[0] % 2:
            raise ValueError("ring must hold 2K frames")
        self.kernel = kernel
        self.keep = (prev, last, ring)
        self.k = ring.shape[0] // 2
        self.frame = ring.shape[1] * ring.shape[2]
        self.ring = &ring[0, 0, 0]

    def write(self, Py_ssize_t slot, bint pooled):
        """ring[slot] = ring[slot + K] = resize(max(prev, last) if pooled else last)."""
        if slot < 0 or slot >= self.k:
            raise IndexError(f"slot {slot} outside 0..{self.k - 1}")
        cdef uint8_t* dst = self.ring + slot * self.frame
        cdef const uint8_t* p = self.prev if pooled else self.last
        cdef Py_ssize_t sp = self.sprev if pooled else self.slast
        cdef int rc = 0
        with nogil:
            if self.rgb:
                rc = self.kernel.run_rgb(p, sp, self.last, self.slast, dst, self.kernel.out_w)
            else:
                self.kernel.run(p, sp, self.last, self.slast, dst, self.kernel.out_w)
            if rc == 0:
                memcpy(dst + self.k * self.frame, dst, self.frame)
        if rc:
            raise MemoryError()

    def fill(self, Py_ssize_t slot):
        """Copy ring[slot] into every slot (a new episode's stack is its first frame, repeated)."""
        if slot < 0 or slot >= self.k:
            raise IndexError(f"slot {slot} outside 0..{self.k - 1}")
        cdef Py_ssize_t i
        cdef uint8_t* src = self.ring + slot * self.frame
        with nogil:
            for i in range(2 * self.k):
                if i != slot:
                    memcpy(self.ring + i * self.frame, src, self.frame)
