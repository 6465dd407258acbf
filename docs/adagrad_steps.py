"""What AdaGrad's accumulator says about its steps, per tensor, from a shard checkpoint.

Usage: python docs/adagrad_steps.py RUN_DIR   (reads RUN_DIR/config.json and RUN_DIR/ckpt/ps0.npz)

For each tensor of the network: the median of sqrt(G) (G = G0 + sum of squared gradients so far), the
RMS gradient that implies (sqrt((G - G0) / t) over t updates), and the step lr * g_rms / sqrt(G) that
a gradient of that size gets now. Where the median sqrt(G) is still sqrt(G0), the squared gradients
have not yet summed to G0: those parameters take plain SGD steps of lr / sqrt(G0) times their gradient.
"""
import json
import os
import sys

import numpy as np

from gorila_zmq import config as C
from gorila_zmq.agents.base import build_network, prepare
from gorila_zmq.ps.layout import ParamLayout


def main(run_dir: str) -> None:
    cfg = C.load(os.path.join(run_dir, "config.json"))
    prepare(cfg)
    layout = ParamLayout.from_module(build_network(cfg))
    with np.load(os.path.join(run_dir, "ckpt", "ps0.npz"), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        G = z["state0"].astype(np.float64)
    if meta.get("optimizer") != "adagrad" or meta.get("start") != 0 or meta.get("stop") != layout.size:
        sys.exit("needs a 1-shard AdaGrad run")
    t, lr, g0 = meta["version"], cfg.ps.lr, cfg.ps.initial_accumulator
    print(f"{run_dir}: {t:,} updates, lr {lr}, G0 {g0:g} (sqrt {np.sqrt(g0):.1e})")
    print("| tensor | parameters | median sqrt(G) | share with sum g^2 < G0 | implied RMS g | step for that g |")
    print("|---|---:|---:|---:|---:|---:|")
    for e in layout.entries:
        g = G[e.offset:e.offset + int(np.prod(e.shape))]
        rms = np.sqrt(max(np.median(g) - g0, 0.0) / t)
        print(f"| {e.name} | {g.size:,} | {np.median(np.sqrt(g)):.2e} | {np.mean(g - g0 < g0):.0%} | {rms:.1e} | "
              f"{lr * rms / np.median(np.sqrt(g)):.1e} |")


if __name__ == "__main__":
    main(sys.argv[1])
