"""Server-side optimisers on flat float32 slices: the fused Cython AdaGrad kernel and its NumPy twin.

AdaGrad (Duchi et al., 2011), as torch.optim.Adagrad with lr_decay=0 and weight_decay=0:
    G += g * g;   theta -= lr * g / (sqrt(G) + eps)
with G starting at `initial_accumulator`. `GORILA_PUREPYTHON=1` selects the NumPy versions.
"""
from __future__ import annotations

import os

import numpy as np

from gorila_zmq._native import load_ext

_ext = load_ext("adagrad")


def default_threads() -> int:
    """Cores this process may run on (GORILA_THREADS overrides)."""
    env = os.environ.get("GORILA_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_THREADS = default_threads()


def _check(theta: np.ndarray, accum: np.ndarray, grad: np.ndarray) -> None:
    for name, a in (("theta", theta), ("accum", accum), ("grad", grad)):
        if a.dtype != np.float32 or a.ndim != 1 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous 1-D float32 array, got {a.dtype} {a.shape}")
    if not (theta.shape == accum.shape == grad.shape):
        raise ValueError(f"shape mismatch: theta {theta.shape}, accum {accum.shape}, grad {grad.shape}")
    if not theta.flags.writeable or not accum.flags.writeable:
        raise ValueError("theta and accum must be writeable")


def adagrad_update_numpy(theta, accum, grad, lr: float, eps: float, nthreads: int = 0) -> None:
    tmp = np.multiply(grad, grad)
    accum += tmp
    np.sqrt(accum, out=tmp)
    tmp += np.float32(eps)
    np.divide(grad, tmp, out=tmp)
    tmp *= np.float32(lr)
    theta -= tmp


def all_finite_numpy(x: np.ndarray) -> bool:
    # The sum is finite iff every element is (or a huge-but-finite vector overflows); check the rare
    # non-finite sum exactly.
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.add.reduce(x, dtype=np.float32)
    return bool(np.isfinite(s)) or bool(np.isfinite(x).all())


def adagrad_update(theta: np.ndarray, accum: np.ndarray, grad: np.ndarray,
                   lr: float, eps: float, nthreads: int = 0) -> None:
    """In-place AdaGrad step on flat float32 arrays; nthreads=0: every core this process may use."""
    _check(theta, accum, grad)
    if _ext is None:
        adagrad_update_numpy(theta, accum, grad, lr, eps)
    else:
        _ext.adagrad_update(theta, accum, grad, float(lr), float(eps), int(nthreads) or _THREADS)


def all_finite(x: np.ndarray) -> bool:
    if x.dtype != np.float32 or x.ndim != 1 or not x.flags.c_contiguous:
        raise ValueError("all_finite takes a contiguous 1-D float32 array")
    if _ext is None:
        return all_finite_numpy(x)
    return bool(_ext.all_finite(x))


IMPLEMENTATION = "numpy" if _ext is None else "cython"
