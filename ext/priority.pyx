# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Prioritized replay's trees: a sum tree (prefix-sum search), a min and a max tree over the same leaves.

Wrapped and validated by gorila_zmq.replay.priority (PriorityTree), whose NumpyTree is the same
algorithm in NumPy with bit-identical results. Never called directly.

Layout: M = the leaf count rounded up to a power of two; node i has children 2i and 2i+1, leaf j is
node M + j; node 1 is the root. Empty leaves hold 0 in the sum and max trees and +inf in the min tree.
"""
from libc.math cimport INFINITY
from libc.stdint cimport int64_t

import numpy as np


cdef class SumTree:
    cdef readonly object sums, mins, maxs
    cdef double[::1] s
    cdef double[::1] m
    cdef double[::1] x
    cdef readonly Py_ssize_t n, size

    def __cinit__(self, Py_ssize_t n):
        cdef Py_ssize_t M = 1
        while M < n:
            M *= 2
        self.n, self.size = n, M
        self.sums = np.zeros(2 * M, np.float64)
        self.mins = np.full(2 * M, np.inf, np.float64)
        self.maxs = np.zeros(2 * M, np.float64)
        self.s, self.m, self.x = self.sums, self.mins, self.maxs

    def set(self, const int64_t[::1] idx, const double[::1] p):
        """Leaf idx[j] = p[j] (0: empty), in order; each ancestor is recomputed from its children."""
        cdef Py_ssize_t j, i, M = self.size
        cdef double a, b
        with nogil:
            for j in range(idx.shape[0]):
                i = M + idx[j]
                self.s[i] = p[j]
                self.m[i] = p[j] if p[j] > 0 else INFINITY
                self.x[i] = p[j]
                i >>= 1
                while i >= 1:
                    self.s[i] = self.s[2 * i] + self.s[2 * i + 1]
                    a = self.m[2 * i]
                    b = self.m[2 * i + 1]
                    self.m[i] = a if a < b else b
                    a = self.x[2 * i]
                    b = self.x[2 * i + 1]
                    self.x[i] = a if a > b else b
                    i >>= 1

    def get(self, const int64_t[::1] idx, double[::1] out):
        cdef Py_ssize_t j, M = self.size
        with nogil:
            for j in range(idx.shape[0]):
                out[j] = self.s[M + idx[j]]

    def find(self, const double[::1] u, int64_t[::1] out):
        """For each prefix mass u[j] in [0, total): the leaf whose interval of the cumulative sum holds it."""
        cdef Py_ssize_t j, i, M = self.size
        cdef double x, left
        with nogil:
            for j in range(u.shape[0]):
                x = u[j]
                i = 1
                while i < M:
                    left = self.s[2 * i]
                    if x >= left:
                        x -= left
                        i = 2 * i + 1
                    else:
                        i = 2 * i
                out[j] = i - M

    def total(self):
        return self.s[1]

    def min(self):
        return self.m[1]

    def max(self):
        return self.x[1]
