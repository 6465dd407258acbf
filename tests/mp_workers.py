"""Functions run in child processes (spawn) by the multi-process tests."""
from __future__ import annotations

import json
import sys

import numpy as np


def grad_for(worker: int, seq: int, n: int) -> np.ndarray:
    """The gradient worker `worker` sends as push `seq`: reproducible, every 7th one poisoned."""
    g = np.random.default_rng([worker, seq]).standard_normal(n).astype(np.float32) * 0.1
    if seq % 7 == 0:
        g[seq % n] = np.nan           # in shard 0's slice
        g[-1 - seq % n] = np.inf      # in the last shard's slice
    return g


def pusher(cfg_dict: dict, worker: int, pushes: int, out_path: str) -> None:
    import zmq
    from gorila_zmq import config as C
    from gorila_zmq.ps.client import GradientPusher, ShardSet
    from gorila_zmq.ps.layout import ParamLayout
    from gorila_zmq.agents.base import build_network

    cfg = C.from_dict(cfg_dict)
    layout = ParamLayout.from_module(build_network(cfg))
    ctx = zmq.Context()
    p = GradientPusher(ctx, ShardSet(cfg, layout), client_id=1000 + worker, record=True)
    for seq in range(1, pushes + 1):
        assert p.push(grad_for(worker, seq, layout.size), p.versions) == seq
    ok = p.flush(30)
    with open(out_path, "w") as f:
        json.dump({"flushed": ok, "stats": p.stats.as_dict(), "applied_log": p.applied_log}, f)
    p.close()
    ctx.destroy(linger=0)


def checkpoint_writer(path: str, n: int) -> None:
    """Writes checkpoints forever (until SIGKILL); each one is self-consistent."""
    from gorila_zmq.roles.ps import save_checkpoint
    v = 0
    while True:
        v += 1
        theta = np.full(n, v, np.float32)
        save_checkpoint(path, theta, theta * 2, {"version": v})
        print(v, flush=True)


if __name__ == "__main__":
    checkpoint_writer(sys.argv[1], int(sys.argv[2]))
