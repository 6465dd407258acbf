# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Replay-memory kernels on raw pointers into one shared-memory segment: slot writes published with
a release store, the validity test of a transition, and the frame-stack / n-step gather.

Wrapped (and validated) by gorila_zmq.replay.memory, which documents the layout and the semantics; its
_NumpyCore is the same algorithm in NumPy, step for step. Never called directly.

Addressing: lane l is a ring of `cap` slots; `writes[l]` counts slots ever written to it (the seqlock
counter), so logical slot L lives at l*cap + L % cap and the reader's retained range is
[max(0, w - cap + 1), w - 1] (the oldest slot is the one the writer overwrites next).
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy, memset

import numpy as np

cdef extern from *:
    """
    #include <stdint.h>
    static inline int64_t gz_load_acquire(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gz_store_release(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void gz_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    """
    int64_t gz_load_acquire(const int64_t *p) noexcept nogil
    void gz_store_release(int64_t *p, int64_t v) noexcept nogil
    void gz_fence_acquire() noexcept nogil
    void __builtin_prefetch(const void* p) noexcept nogil

# Slot flags (gorila_zmq.replay.numpy_core.START/TERMINATED/TRUNCATED).
cdef enum:
    START = 1        # the slot holds an episode's first frame; no transition leads into it
    TERM = 2         # the transition into this slot ended the episode: discount 0
    TRUNC = 4        # ... or cut it short: bootstrap from this (real, final) frame
    ENDED = 6


cdef inline uint8_t* _acquire(object obj, Py_buffer* view, Py_ssize_t nbytes, bint writable,
                              str what) except NULL:
    PyObject_GetBuffer(obj, view, (PyBUF_WRITABLE if writable else PyBUF_SIMPLE))
    if view.len != nbytes:
        PyBuffer_Release(view)
        raise ValueError(f"{what}: expected {nbytes} bytes, got {view.len}")
    return <uint8_t*> view.buf


cdef class Core:
    """Pointers into the segment; `seg` (a uint8 NumPy view of all of it) keeps the mapping alive."""
    cdef object seg
    cdef uint8_t* frames
    cdef uint8_t* actions
    cdef float* rewards
    cdef uint8_t* flags
    cdef int64_t* writes
    cdef int64_t* episodes
    cdef Py_ssize_t lanes, cap, stack, nstep, fb, ab
    cdef double gamma
    cdef bint pad_repeat, full_windows

    def __cinit__(self, seg, Py_ssize_t off_writes, Py_ssize_t off_episodes, Py_ssize_t off_frames,
                  Py_ssize_t off_actions, Py_ssize_t off_rewards, Py_ssize_t off_flags,
                  Py_ssize_t lanes, Py_ssize_t cap, Py_ssize_t stack, Py_ssize_t nstep,
                  Py_ssize_t frame_nbytes, Py_ssize_t action_nbytes, double gamma,
                  bint pad_repeat=False, bint full_windows=False):
        cdef uint8_t[::1] mv = seg
        cdef uint8_t* base = &mv[0]
        self.seg = seg
        self.writes = <int64_t*> (base + off_writes)
        self.episodes = <int64_t*> (base + off_episodes)
        self.frames = base + off_frames
        self.actions = base + off_actions
        self.rewards = <float*> (base + off_rewards)
        self.flags = base + off_flags
        self.lanes, self.cap, self.stack, self.nstep = lanes, cap, stack, nstep
        self.fb, self.ab, self.gamma = frame_nbytes, action_nbytes, gamma
        self.pad_repeat, self.full_windows = pad_repeat, full_windows

    def release(self):
        self.seg = None
        self.frames = self.actions = self.flags = NULL
        self.rewards = NULL
        self.writes = self.episodes = NULL

    # ---------------------------------------------------------------- writer

    def write(self, Py_ssize_t lane, frame, action, float reward, int flags):
        """Write one slot of `lane` and publish it. START first ends an open episode as truncated.
        Returns False (writing nothing) for a transition on a lane with no open episode."""
        cdef Py_buffer fv, av
        cdef uint8_t* f = _acquire(frame, &fv, self.fb, False, "frame")
        cdef uint8_t* a
        cdef bint ok
        try:
            a = _acquire(action, &av, self.ab, False, "action")
            try:
                with nogil:
                    ok = self._write(lane, f, a, reward, <uint8_t> flags)
            finally:
                PyBuffer_Release(&av)
        finally:
            PyBuffer_Release(&fv)
        return ok

    def write_many(self, const int64_t[::1] lanes, frames, actions, const float[::1] rewards,
                   const uint8_t[::1] flags):
        """Transitions in order; returns the index of the first one refused (no open episode), or -1."""
        cdef Py_ssize_t n = lanes.shape[0], i, bad = -1
        cdef Py_buffer fv, av
        cdef uint8_t* f = _acquire(frames, &fv, n * self.fb, False, "frames")
        cdef uint8_t* a
        try:
            a = _acquire(actions, &av, n * self.ab, False, "actions")
            try:
                with nogil:
                    for i in range(n):
                        if not self._write(lanes[i], f + i * self.fb, a + i * self.ab, rewards[i],
                                           flags[i]):
                            bad = i
                            break
            finally:
                PyBuffer_Release(&av)
        finally:
            PyBuffer_Release(&fv)
        return bad

    cdef bint _write(self, Py_ssize_t lane, const uint8_t* frame, const uint8_t* action, float reward,
                     uint8_t fl) noexcept nogil:
        cdef uint8_t* lf = self.flags + lane * self.cap
        cdef int64_t w = self.writes[lane]          # only this process writes it
        cdef Py_ssize_t last = (w - 1) % self.cap
        cdef Py_ssize_t slot = lane * self.cap + w % self.cap
        cdef bint open_ = w > 0 and (lf[last] & ENDED) == 0
        if fl & START:
            if open_:
                # An episode abandoned without an end flag (a restarted actor): end it as truncated.
                # Readers see either flag value with the same meaning (see gorila_zmq.replay.memory).
                lf[last] = lf[last] | TRUNC
            memset(self.actions + slot * self.ab, 0, self.ab)
            self.rewards[slot] = 0
            self.episodes[lane] += 1
        else:
            if not open_:
                return False
            memcpy(self.actions + slot * self.ab, action, self.ab)
            self.rewards[slot] = reward
        memcpy(self.frames + slot * self.fb, frame, self.fb)
        self.flags[slot] = fl
        gz_store_release(&self.writes[lane], w + 1)   # publish after the data
        return True

    # ---------------------------------------------------------------- readers

    def snapshot(self, int64_t[::1] w, int64_t[::1] lo, int64_t[::1] cum):
        """Read every lane's counter (acquire); fill retained ranges; return how many slots in all."""
        cdef Py_ssize_t l
        cdef int64_t total = 0, x
        with nogil:
            for l in range(self.lanes):
                x = gz_load_acquire(&self.writes[l])
                w[l] = x
                lo[l] = x - self.cap + 1 if x > self.cap - 1 else 0
                cum[l] = total
                total += x - lo[l]
        return total

    cdef bint _valid(self, Py_ssize_t l, int64_t L, int64_t w, int64_t lo, int64_t* k, bint* term,
                     int64_t* low) noexcept nogil:
        """Transition from logical slot L of lane l: its n-step length k, whether it terminated, and
        the lowest slot its obs stack reads; False when it crosses an episode start or the head."""
        cdef const uint8_t* lf = self.flags + l * self.cap
        cdef int64_t i, x
        cdef uint8_t f
        if L < lo or L + 1 > w - 1:
            return False
        k[0] = self.nstep
        term[0] = False
        for i in range(1, self.nstep + 1):
            x = L + i
            if x > w - 1:
                return False                     # the window is not written yet
            f = lf[x % self.cap]
            if f & START:
                return False                     # next slot belongs to another episode
            if f & ENDED:
                if self.full_windows and i < self.nstep and not (f & TERM):
                    return False                 # cut short by a truncation (DrQ-v2 draws none)
                k[0] = i
                term[0] = (f & TERM) != 0
                break
        x = L
        for i in range(self.stack - 1):
            if lf[x % self.cap] & START:
                break
            x -= 1
            if x < lo:
                return False                     # part of the stack is already overwritten
        low[0] = x
        return True

    cdef void _gather(self, Py_ssize_t l, int64_t L, int64_t k, bint term, uint8_t* obs, uint8_t* nxt,
                      uint8_t* act, float* rew, float* disc) noexcept nogil:
        cdef Py_ssize_t S = self.stack, fb = self.fb, cap = self.cap, p
        cdef const uint8_t* base = self.frames + l * cap * fb
        cdef const uint8_t* lf = self.flags + l * cap
        cdef const float* lr = self.rewards + l * cap
        cdef int64_t x = L, i
        cdef bint zero = False
        cdef double r = 0.0, g = 1.0
        for p in range(S - 1, -1, -1):
            if zero:                             # before the episode's first frame: zeros or that
                if self.pad_repeat:              # frame again, never frames of the previous episode
                    memcpy(obs + p * fb, obs + (p + 1) * fb, fb)
                else:
                    memset(obs + p * fb, 0, fb)
            else:
                memcpy(obs + p * fb, base + (x % cap) * fb, fb)
                zero = (lf[x % cap] & START) != 0
                x -= 1
        if nxt == NULL:
            # shared-frames row (n_step 1, so k = 1): next_obs is the row's frames 1..S, a view the
            # caller holds; only its newest frame is written, after obs's
            memcpy(obs + S * fb, base + ((L + 1) % cap) * fb, fb)
        elif k < S:
            # next_obs is obs shifted by k frames: reuse the row just written (it is in cache)
            memcpy(nxt, obs + k * fb, (S - k) * fb)
            for i in range(1, k + 1):
                memcpy(nxt + (S - k + i - 1) * fb, base + ((L + i) % cap) * fb, fb)
        else:
            for p in range(S):
                memcpy(nxt + p * fb, base + ((L + k - S + 1 + p) % cap) * fb, fb)
        memcpy(act, self.actions + (l * cap + (L + 1) % cap) * self.ab, self.ab)
        for i in range(1, k + 1):
            r += g * <double> lr[(L + i) % cap]
            g *= self.gamma
        rew[0] = <float> r
        disc[0] = 0.0 if term else <float> g

    cdef inline Py_ssize_t _lane_of(self, const int64_t* cum, int64_t u) noexcept nogil:
        # the largest l with cum[l] <= u (empty lanes share their successor's cum)
        cdef Py_ssize_t a = 0, b = self.lanes - 1, m
        while a < b:
            m = (a + b + 1) // 2
            if cum[m] <= u:
                a = m
            else:
                b = m - 1
        return a

    def gather(self, const double[::1] x, int64_t total, const int64_t[::1] w,
               const int64_t[::1] lo, const int64_t[::1] cum, const int64_t[::1] rows,
               Py_ssize_t filled, obs, next_obs, action, float[::1] reward, float[::1] discount,
               int64_t[::1] index, int64_t[::1] row_lane, int64_t[::1] row_low):
        """Candidates u = floor(x * total) (x uniform in [0, 1): uniform over the snapshot's retained
        slots) are tested in order; each valid one is gathered into the next unfilled row of `rows`.
        Returns the new number of filled rows. next_obs None: `obs` is a shared-frames buffer, rows of
        stack + 1 frames (n_step 1 only), obs their first `stack` frames and next_obs their last."""
        cdef bint shared = next_obs is None
        cdef Py_ssize_t B = reward.shape[0], ob = (self.stack + shared) * self.fb, nrows = rows.shape[0]
        cdef Py_ssize_t j, l, r, m = 0, want = nrows - filled
        cdef int64_t L, k, low, u
        cdef bint term
        cdef Py_buffer ov, nv, av
        cdef uint8_t* po
        cdef uint8_t* pn
        cdef uint8_t* pa
        if shared and self.nstep != 1:
            raise ValueError("a shared-frames batch needs n_step == 1")
        if want <= 0:
            return filled
        cdef int64_t[:, ::1] acc = np.empty((want, 4), np.int64)     # lane, L, k, term
        # Pass 1: validity (reads only the small flags array).
        with nogil:
            for j in range(x.shape[0]):
                if m >= want:
                    break
                u = <int64_t> (x[j] * total)
                if u >= total:
                    u = total - 1
                l = self._lane_of(&cum[0], u)
                L = lo[l] + (u - cum[l])
                if not self._valid(l, L, w[l], lo[l], &k, &term, &low):
                    continue
                r = rows[filled + m]
                acc[m, 0] = l
                acc[m, 1] = L
                acc[m, 2] = k
                acc[m, 3] = term
                index[r] = l * self.cap + L % self.cap
                row_lane[r] = l
                row_low[r] = low
                m += 1
        po = _acquire(obs, &ov, B * ob, True, "frames" if shared else "obs")
        try:
            pn = NULL
            if not shared:
                pn = _acquire(next_obs, &nv, B * ob, True, "next_obs")
            try:
                pa = _acquire(action, &av, B * self.ab, True, "action")
                try:
                    # Pass 2: the copies, fetching the next row's frames while copying this one.
                    with nogil:
                        if m > 0:
                            self._prefetch(acc[0, 0], acc[0, 1], acc[0, 2])
                        for j in range(m):
                            if j + 1 < m:
                                self._prefetch(acc[j + 1, 0], acc[j + 1, 1], acc[j + 1, 2])
                            r = rows[filled + j]
                            self._gather(acc[j, 0], acc[j, 1], acc[j, 2], acc[j, 3] != 0,
                                         po + r * ob, NULL if shared else pn + r * ob, pa + r * self.ab,
                                         &reward[r], &discount[r])
                finally:
                    PyBuffer_Release(&av)
            finally:
                if not shared:
                    PyBuffer_Release(&nv)
        finally:
            PyBuffer_Release(&ov)
        return filled + m

    cdef void _prefetch(self, Py_ssize_t l, int64_t L, int64_t k) noexcept nogil:
        # The row's frames are slots L-stack+1 .. L+k: one run of memory unless it wraps. Asking for
        # them a row ahead overlaps their DRAM latency with the current row's copies (~10%).
        cdef Py_ssize_t cap = self.cap, fb = self.fb, off
        cdef const uint8_t* base = self.frames + l * cap * fb
        cdef int64_t x = L - self.stack + 1
        for x in range(x if x > 0 else 0, L + k + 1):
            off = 0
            while off < fb:
                __builtin_prefetch(base + (x % cap) * fb + off)
                off += 64

    def torn(self, const int64_t[::1] rows, Py_ssize_t n, const int64_t[::1] row_lane,
             const int64_t[::1] row_low, int64_t[::1] out):
        """Seqlock re-check after a gather: rows whose lowest slot may have been overwritten since
        (the writer has published w and may be writing slot w, which reuses logical w - cap)."""
        cdef Py_ssize_t j, r, bad = 0
        with nogil:
            gz_fence_acquire()                   # the gather's loads happen before these
            for j in range(n):
                r = rows[j]
                if row_low[r] <= gz_load_acquire(&self.writes[row_lane[r]]) - self.cap:
                    out[bad] = r
                    bad += 1
        return bad

    def valid_u(self, const int64_t[::1] w, const int64_t[::1] lo, const int64_t[::1] cum,
                int64_t[::1] out=None):
        """Every valid candidate of the snapshot, ascending, into `out`; returns how many (only
        counts them when out is None)."""
        cdef Py_ssize_t l, n = 0
        cdef int64_t L, k, low
        cdef bint term, keep = out is not None
        with nogil:
            for l in range(self.lanes):
                for L in range(lo[l], w[l]):
                    if self._valid(l, L, w[l], lo[l], &k, &term, &low):
                        if keep:
                            out[n] = cum[l] + (L - lo[l])
                        n += 1
        return n
