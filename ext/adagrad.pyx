# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused AdaGrad: one pass over (theta, G, g), no temporaries, nogil, OpenMP across cores.

Wrapped (and validated) by gorila_zmq.optim; never called directly.
"""
from cython.parallel cimport prange
from libc.math cimport sqrtf
from libc.stdint cimport uint32_t

# Below this many floats one thread wins: starting the OpenMP team costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN = 1 << 16


def adagrad_update(float[::1] theta, float[::1] accum, const float[::1] grad,
                   float lr, float eps, int nthreads=0):
    """G += g*g; theta -= lr * g / (sqrt(G) + eps), elementwise, in place."""
    cdef Py_ssize_t n = theta.shape[0], i
    cdef float g, G
    cdef int nt = nthreads
    with nogil:
        if nt == 1 or n < PARALLEL_MIN:
            for i in range(n):
                g = grad[i]
                G = accum[i] + g * g
                accum[i] = G
                theta[i] = theta[i] - lr * g / (sqrtf(G) + eps)
        elif nt > 1:
            for i in prange(n, schedule="static", num_threads=nt):
                g = grad[i]
                G = accum[i] + g * g
                accum[i] = G
                theta[i] = theta[i] - lr * g / (sqrtf(G) + eps)
        else:
            for i in prange(n, schedule="static"):
                g = grad[i]
                G = accum[i] + g * g
                accum[i] = G
                theta[i] = theta[i] - lr * g / (sqrtf(G) + eps)


def all_finite(const float[::1] x):
    """True when no element is NaN or +-Inf (exponent bits all ones), checked in one vectorised pass."""
    cdef Py_ssize_t n = x.shape[0], i
    cdef const uint32_t* u = <const uint32_t*> &x[0] if n > 0 else NULL
    cdef uint32_t bad = 0
    with nogil:
        for i in range(n):
            bad |= (u[i] & 0x7f800000u) == 0x7f800000u
    return bad == 0
