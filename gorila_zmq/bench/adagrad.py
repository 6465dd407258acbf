"""AdaGrad on a flat float32 vector: fused Cython kernel vs NumPy vs torch, plus a plain memory copy.

Sizes: the Nature DQN (1,687,206 floats, ~6.7 MB per array: cache-resident-ish on big L3s) and a
vector far larger than any cache, where every variant is bound by memory traffic: the fused kernel
moves 5 streams (read theta, G, g; write theta, G); torch's in-place sequence moves ~11.
"""
from __future__ import annotations

import numpy as np
import torch

from gorila_zmq.ps import optim
from gorila_zmq._native import try_load_ext
from gorila_zmq.bench import Report, best_time

DESCRIPTION = __doc__.splitlines()[0]
NATURE_DQN = 1_687_206


def add_arguments(p):
    p.add_argument("--large", type=int, default=32 * 1024 * 1024,
                   help="floats in the large vector (default 32 Mi floats = 128 MiB per array)")
    p.add_argument("--repeat", type=int, default=7, help="best of this many timings")


def _variants(n: int, rng):
    lr, eps = 1e-4, 1e-10           # small steps: theta stays finite over thousands of calls
    theta = rng.standard_normal(n, dtype=np.float32)
    accum = np.full(n, 0.1, np.float32)
    grad = rng.standard_normal(n, dtype=np.float32)
    t_theta, t_accum, t_grad = (torch.from_numpy(a) for a in (theta.copy(), accum.copy(), grad.copy()))
    p = torch.nn.Parameter(torch.from_numpy(theta.copy()))
    p.grad = torch.from_numpy(grad.copy())
    opt = torch.optim.Adagrad([p], lr=lr, eps=eps, initial_accumulator_value=0.1)

    def torch_inplace():
        t_accum.addcmul_(t_grad, t_grad)
        t_theta.addcdiv_(t_grad, t_accum.sqrt().add_(eps), value=-lr)

    out = {"torch_inplace": torch_inplace, "torch_optim": opt.step,
           "numpy": lambda: optim.adagrad_update_numpy(theta, accum, grad, lr, eps)}
    ext = try_load_ext("optim")
    if ext is not None:
        nt = optim.default_threads()
        out["fused"] = lambda: ext.adagrad_update(theta, accum, grad, lr, eps, nt)
        out["fused_1thread"] = lambda: ext.adagrad_update(theta, accum, grad, lr, eps, 1)
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    out["copy_numpy"] = lambda: np.copyto(dst, src)
    out["copy_torch"] = lambda: tdst.copy_(tsrc)
    return out


def run(args) -> Report:
    rep = Report()
    rng = np.random.default_rng(0)
    rep.notes.append(f"torch threads: {torch.get_num_threads()}; fused kernel: "
                     f"{'built' if try_load_ext('optim') else 'NOT BUILT (run make build)'}")
    results = {}
    for label, n in (("dqn", NATURE_DQN), ("large", args.large)):
        times = {k: best_time(f, repeat=args.repeat) for k, f in _variants(n, rng).items()}
        results[label] = (n, times)
        for k, t in times.items():
            rep.row(f"{label} ({n:,} floats) {k}", t * 1e3, "ms")
    if "fused" not in results["dqn"][1]:
        rep.notes.append("the fused kernel is not built: only baselines measured")
        return rep
    for label, key in (("dqn", "fused_vs_torch_speedup"), ("large", "fused_vs_torch_speedup_large")):
        n, t = results[label]
        rep.metrics[key] = min(t["torch_inplace"], t["torch_optim"]) / t["fused"]
    n, t = results["large"]
    copy_t = min(t["copy_numpy"], t["copy_torch"])
    copy_bw = 2 * 4 * n / copy_t                       # read + write of one array
    fused_bw = 5 * 4 * n / t["fused"]                  # read theta, G, g; write theta, G
    rep.row("large copy bandwidth (best of numpy/torch)", copy_bw / 1e9, "GB/s")
    rep.row("large fused kernel bandwidth", fused_bw / 1e9, "GB/s")
    rep.metrics["fused_bandwidth_fraction"] = fused_bw / copy_bw
    rep.metrics["fused_vs_numpy_speedup"] = results["dqn"][1]["numpy"] / results["dqn"][1]["fused"]
    return rep
