"""The fused AdaGrad kernel (and its NumPy twin) against torch.optim.Adagrad."""
import numpy as np
import pytest
import torch

from gorila_zmq.ps import optim
from gorila_zmq._native import try_load_ext

_ext = try_load_ext("optim")
IMPLS = {"numpy": (optim.adagrad_update_numpy, optim.all_finite_numpy)}
if _ext is not None:
    IMPLS["cython"] = (lambda t, a, g, lr, eps: _ext.adagrad_update(t, a, g, lr, eps, 2), _ext.all_finite)
    IMPLS["cython-1thread"] = (lambda t, a, g, lr, eps: _ext.adagrad_update(t, a, g, lr, eps, 1), _ext.all_finite)


def test_compiled_kernel_present_unless_pure_python():
    from gorila_zmq._native import pure_python
    if not pure_python():
        assert _ext is not None, "the Cython AdaGrad kernel must be built"
        assert optim.IMPLEMENTATION == "cython"
    else:
        assert optim.IMPLEMENTATION == "numpy"


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("n", [1, 1000, 200_003])
def test_matches_torch_adagrad_over_100_steps(impl, n):
    update, _ = IMPLS[impl]
    lr, eps, init = 0.05, 1e-10, 0.1
    rng = np.random.default_rng(n)
    theta0 = rng.standard_normal(n).astype(np.float32)
    p = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    opt = torch.optim.Adagrad([p], lr=lr, eps=eps, initial_accumulator_value=init)
    theta, accum = theta0.copy(), np.full(n, init, np.float32)
    for _ in range(100):
        g = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        update(theta, accum, g, lr, eps)
    ref = p.detach().numpy()
    rel = np.abs(theta - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert rel <= 1e-5, rel
    np.testing.assert_allclose(accum, opt.state[p]["sum"].numpy(), rtol=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_all_finite(impl):
    _, finite = IMPLS[impl]
    x = np.ones(100_001, np.float32)
    assert finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        for pos in (0, 50_000, 100_000):
            y = x.copy()
            y[pos] = bad
            assert not finite(y), (bad, pos)
    assert finite(np.full(10, 3e38, np.float32))  # huge but finite: its sum overflows, it is still valid
    assert finite(np.zeros(0, np.float32))


def test_wrapper_validates_inputs():
    t = np.zeros(10, np.float32)
    with pytest.raises(ValueError):
        optim.adagrad_update(t, np.zeros(10, np.float64), t.copy(), 0.1, 1e-10)
    with pytest.raises(ValueError):
        optim.adagrad_update(t, np.zeros(9, np.float32), t.copy(), 0.1, 1e-10)
    with pytest.raises(ValueError):
        optim.adagrad_update(np.zeros((2, 5), np.float32), np.zeros(10, np.float32), t, 0.1, 1e-10)
    with pytest.raises(ValueError):
        optim.all_finite(np.zeros(3, np.float64))


ADAM = {"numpy": lambda *a: optim.adam_update_numpy(*a)}
if _ext is not None:
    ADAM["cython"] = lambda *a: _ext.adam_update(*a, 2)
    ADAM["cython-1thread"] = lambda *a: _ext.adam_update(*a, 1)


@pytest.mark.parametrize("impl", sorted(ADAM))
@pytest.mark.parametrize("n", [1, 200_003])
def test_adam_matches_torch_adam_over_100_steps(impl, n):
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    rng = np.random.default_rng(n)
    theta0 = rng.standard_normal(n).astype(np.float32)
    p = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    opt = torch.optim.Adam([p], lr=lr, betas=(b1, b2), eps=eps)
    theta, m, v = theta0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for t in range(1, 101):
        g = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        ADAM[impl](theta, m, v, g, b1, b2, lr / (1 - b1 ** t), 1 / (1 - b2 ** t) ** 0.5, eps)
    ref = p.detach().numpy()
    assert np.abs(theta - ref).max() / np.abs(ref).max() <= 1e-5
    # m cancels towards 0 from gradients up to ~30: compare on the gradients' scale (lerp vs mul-add rounding)
    np.testing.assert_allclose(m, opt.state[p]["exp_avg"].numpy(), rtol=1e-4, atol=1e-4)


def test_adam_wrapper_counts_steps_from_one():
    t = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="from 1"):
        optim.adam_update(t, t.copy(), t.copy(), t.copy(), 1e-3, 0)
