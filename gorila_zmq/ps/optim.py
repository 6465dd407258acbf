"""Server-side optimisers on flat float32 slices: fused Cython kernels and their NumPy twins.

AdaGrad (Duchi et al., 2011; Gorila), as torch.optim.Adagrad with lr_decay=0 and weight_decay=0:
    G += g * g;   theta -= lr * g / (sqrt(G) + eps)
with G starting at `initial_accumulator`. Adam (Kingma & Ba; DrQ-v2), as torch.optim.Adam without
weight decay: m, v moving averages with bias correction at step t = the shard's version + 1.
Either one's lr ramps linearly over the shard's first `lr_warmup_updates` updates (`ServerOptimizer.lr_at`).
`GORILA_PUREPYTHON=1` selects the NumPy versions. `make_server_optimizer(ps_cfg)` picks by config.
"""
from __future__ import annotations

import os

import numpy as np

from gorila_zmq._native import load_ext

_ext = load_ext("optim")


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


def adam_update_numpy(theta, m, v, grad, b1: float, b2: float, step_size: float, inv_sqrt_bc2: float,
                      eps: float, nthreads: int = 0) -> None:
    m *= np.float32(b1)
    m += np.float32(1 - b1) * grad
    v *= np.float32(b2)
    v += np.float32(1 - b2) * grad * grad
    denom = np.sqrt(v)
    denom *= np.float32(inv_sqrt_bc2)
    denom += np.float32(eps)
    theta -= np.float32(step_size) * m / denom


def adam_update(theta, m, v, grad, lr: float, step: int, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-8, nthreads: int = 0) -> None:
    """In-place Adam step number `step` (1-based) on flat float32 arrays."""
    _check(theta, m, grad)
    _check(theta, v, grad)
    if step < 1:
        raise ValueError("Adam steps count from 1")
    step_size = lr / (1 - b1 ** step)
    inv_sqrt_bc2 = 1.0 / (1 - b2 ** step) ** 0.5
    if _ext is None:
        adam_update_numpy(theta, m, v, grad, b1, b2, step_size, inv_sqrt_bc2, eps)
    else:
        _ext.adam_update(theta, m, v, grad, float(b1), float(b2), float(step_size), float(inv_sqrt_bc2),
                         float(eps), int(nthreads) or _THREADS)


class ServerOptimizer:
    """What a shard needs of an optimiser: how many state arrays, their initial value, one step."""

    name = "adagrad"
    n_states = 1

    def __init__(self, ps_cfg):
        self.cfg = ps_cfg

    def init_states(self, states: list[np.ndarray]) -> None:
        states[0][:] = self.cfg.initial_accumulator

    def lr_at(self, version: int) -> float:
        """The learning rate of the update that takes the shard from `version` to `version` + 1."""
        n = self.cfg.lr_warmup_updates
        return self.cfg.lr * min(1.0, (version + 1) / n) if n > 0 else self.cfg.lr

    def apply(self, theta, states, grad, version: int) -> None:
        adagrad_update(theta, states[0], grad, self.lr_at(version), self.cfg.eps, self.cfg.apply_threads)


class ServerAdam(ServerOptimizer):
    name = "adam"
    n_states = 2

    def init_states(self, states) -> None:
        states[0][:] = 0.0
        states[1][:] = 0.0

    def apply(self, theta, states, grad, version: int) -> None:
        c = self.cfg
        adam_update(theta, states[0], states[1], grad, self.lr_at(version), version + 1, c.adam_beta1,
                    c.adam_beta2, c.adam_eps, c.apply_threads)


def make_server_optimizer(ps_cfg) -> ServerOptimizer:
    return {"adagrad": ServerOptimizer, "adam": ServerAdam}[ps_cfg.optimizer](ps_cfg)
