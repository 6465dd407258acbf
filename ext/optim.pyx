# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused server-side optimisers: AdaGrad (one pass over theta, G, g) and Adam (theta, m, v, g), no
temporaries, nogil, split across cores by OpenMP.

The inner loops live in gz_simd.h (one clone per instruction set). Wrapped (and validated) by
gorila_zmq.ps.optim; never called directly.
"""
from cython.parallel cimport prange

cdef extern from "gz_simd.h" nogil:
    void gz_adagrad(float* theta, float* accum, const float* grad, Py_ssize_t n, float lr, float eps)
    void gz_adam(float* theta, float* m, float* v, const float* grad, Py_ssize_t n, float b1, float b2,
                 float step_size, float inv_sqrt_bc2, float eps)
    int gz_all_finite(const float* x, Py_ssize_t n)

# Below this many floats one thread wins: starting the OpenMP team costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN = 1 << 16


cdef inline Py_ssize_t _chunk(Py_ssize_t n, int nt) noexcept nogil:
    # whole cache lines (16 floats) per thread, so threads never share a line
    cdef Py_ssize_t c = (n + nt - 1) // nt
    return (c + 15) // 16 * 16


def adagrad_update(float[::1] theta, float[::1] accum, const float[::1] grad,
                   float lr, float eps, int nthreads):
    """G += g*g; theta -= lr * g / (sqrt(G) + eps), elementwise, in place, on `nthreads` threads."""
    cdef Py_ssize_t n = theta.shape[0], t, start, stop, c
    cdef int nt = nthreads if n >= PARALLEL_MIN else 1
    if n == 0:
        return
    if nt <= 1:
        with nogil:
            gz_adagrad(&theta[0], &accum[0], &grad[0], n, lr, eps)
        return
    c = _chunk(n, nt)
    for t in prange(nt, nogil=True, schedule="static", num_threads=nt):
        start = t * c
        stop = min(n, start + c)
        if start < stop:
            gz_adagrad(&theta[start], &accum[start], &grad[start], stop - start, lr, eps)


def all_finite(const float[::1] x):
    """True when no element is NaN or +-Inf."""
    cdef Py_ssize_t n = x.shape[0]
    cdef int ok = 1
    if n == 0:
        return True
    with nogil:
        ok = gz_all_finite(&x[0], n)
    return ok != 0


def adam_update(float[::1] theta, float[::1] m, float[::1] v, const float[::1] grad, float b1, float b2,
                float step_size, float inv_sqrt_bc2, float eps, int nthreads):
    """One Adam step in place (bias corrections folded into step_size and inv_sqrt_bc2 by the caller)."""
    cdef Py_ssize_t n = theta.shape[0], t, start, stop, c
    cdef int nt = nthreads if n >= PARALLEL_MIN else 1
    if n == 0:
        return
    if nt <= 1:
        with nogil:
            gz_adam(&theta[0], &m[0], &v[0], &grad[0], n, b1, b2, step_size, inv_sqrt_bc2, eps)
        return
    c = _chunk(n, nt)
    for t in prange(nt, nogil=True, schedule="static", num_threads=nt):
        start = t * c
        stop = min(n, start + c)
        if start < stop:
            gz_adam(&theta[start], &m[start], &v[start], &grad[start], stop - start, b1, b2, step_size,
                    inv_sqrt_bc2, eps)
