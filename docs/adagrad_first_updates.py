"""What the shard optimiser's first updates do to the Nature DQN network on Pong, offline.

Usage: python docs/adagrad_first_updates.py [--updates N] [VARIANT ...]   (variants: see VARIANTS)
       python docs/adagrad_first_updates.py --checkpoint RUN_DIR [RUN_DIR ...]

One network initialisation and one replay of 25,000 random-policy Pong transitions (the data the first
updates of a run see); then, for each variant, the dev preset's DQN loss (Double DQN, 3-step, Huber,
target sync) and N updates with the variant's optimiser as torch.optim on a copy of that network. At
updates 10, 100, 500, 1000, ... it prints, per weight tensor, how far the weights have moved relative to
their initial norm, ||theta - theta0|| / ||theta0||, and, per ReLU, the share of units that are zero on
every input of a fixed batch of 256 (dead units; for a conv layer a channel zero at every position).
Takes both cores for about 2 minutes per 1,000 updates of a variant whose network stays alive.
With --checkpoint: the dead shares (and the spread of Q over the batch) of each 1-shard run's last
shard checkpoint (RUN_DIR/ckpt/ps0.npz) on the same batch instead.
"""
import argparse
import copy
import json
import os
import time

import numpy as np
import torch

from gorila_zmq import config as C
from gorila_zmq.agents import base as agents
from gorila_zmq.agents.common import OutlierFilter
from gorila_zmq.envs import env_spec, make_vec_env
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.replay.memory import ReplayMemory
from gorila_zmq.roles.learner import batch_to_device

# name: (optimiser, lr, initial accumulator, warm-up updates of a linear lr ramp)
VARIANTS = {
    "adam": ("adam", 1e-4, 0.0, 0),                        # the dev preset (run 3 learned)
    "adagrad-A": ("adagrad", 0.03, 1e-6, 0),               # screen A
    "adagrad-E": ("adagrad", 0.03, 1e-10, 0),              # screen E
    "adagrad-E-warm10k": ("adagrad", 0.03, 1e-10, 10000),  # screen E's settings, ps.lr_warmup_updates=10000
}
MARKS = (10, 100, 500, 1000, 2000, 4000, 8000)


def filled_replay(cfg, agent, spec, transitions=25000):
    vec = make_vec_env(cfg, seed=0)
    rb = ReplayMemory(transitions + 5000, n_step=cfg.agent.n_step, gamma=cfg.agent.gamma, lanes=vec.n,
                      **agent.record(spec).memory_args())
    _, frames = vec.reset(seed=0)
    for e in range(vec.n):
        rb.start_episode(frames[e], lane=e)
    rng = np.random.default_rng(0)
    while len(rb) < transitions:
        a = rng.integers(0, spec.n_actions, size=vec.n)
        res = vec.step(a)
        for e in range(vec.n):
            rb.add(a[e], float(res.reward[e]), res.frames[e], bool(res.terminated[e]), bool(res.truncated[e]),
                   lane=e)
            if e in res.reset_frames:
                rb.start_episode(res.reset_frames[e], lane=e)
    vec.close()
    return rb


def dead_units(net, obs) -> dict:
    out, hooks = {}, []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.ReLU):
            def hook(m, i, o, name=name):
                o = o.detach()
                o = o.transpose(0, 1).reshape(o.shape[1], -1) if o.dim() == 4 else o.t()
                out[name] = float((o.abs().sum(1) == 0).float().mean())
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net(obs)
    for h in hooks:
        h.remove()
    return out


def run(cfg, agent, rb, init, probe_obs, name, kind, lr, g0, warm, updates):
    online = copy.deepcopy(init)
    theta0 = {k: v.clone() for k, v in online.state_dict().items()}
    learning = agent.learning(cfg, online, lambda m: m.load_state_dict(online.state_dict()), 0)
    if kind == "adam":
        opt = torch.optim.Adam(online.parameters(), lr=lr, eps=1e-8)
    else:
        opt = torch.optim.Adagrad(online.parameters(), lr=lr, eps=1e-10, initial_accumulator_value=g0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warm) if warm else 1.0)
    filt = OutlierFilter(cfg.agent.outlier_k, cfg.agent.outlier_warmup)
    batch, rng, t0 = rb.allocate_batch(cfg.agent.batch_size), np.random.default_rng(2), time.time()
    for u in range(1, updates + 1):
        rb.sample(cfg.agent.batch_size, rng, out=batch)
        b = batch_to_device(batch.as_tensors(), torch.device("cpu"), False, False)
        _, ok = learning.gradients(b, u, filt.accept)
        if ok:
            opt.step()
            sched.step()
            learning.after_update(u)
        if u in MARKS or u == updates:
            sd = online.state_dict()
            moved = " ".join(f"{k[:-7]}:{float((sd[k] - theta0[k]).norm() / theta0[k].norm()):.3g}"
                             for k in sd if k.endswith(".weight"))
            dead = " ".join(f"{k}:{v:.2f}" for k, v in dead_units(online, probe_obs).items())
            print(f"{name:18s} {u:5d} {time.time() - t0:4.0f}s  moved {moved} | dead {dead}", flush=True)


def checkpoint(cfg, agent, run_dir, probe_obs):
    net = agent.make_network(cfg)
    with np.load(os.path.join(run_dir, "ckpt", "ps0.npz"), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        if meta.get("start") != 0:
            raise SystemExit(f"{run_dir}: needs a 1-shard run")
        ParamLayout.from_module(net).load_into(net, np.ascontiguousarray(z["theta"], np.float32))
    with torch.no_grad():
        q = net(probe_obs)
    dead = " ".join(f"{k}:{v:.2f}" for k, v in dead_units(net, probe_obs).items())
    print(f"{run_dir}: version {meta['version']}  dead {dead} | Q mean {float(q.mean()):.3f}, "
          f"std over the batch {float(q.std()):.4f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--checkpoint", nargs="+", metavar="RUN_DIR", help="inspect these runs' checkpoints instead")
    args = p.parse_args()
    args.variants = [] if args.checkpoint else (args.variants or list(VARIANTS))
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(2)
    cfg = C.load(preset="dev", overrides=["env.name=Pong"])
    agent, spec = agents.prepare(cfg), env_spec(cfg)
    torch.manual_seed(0)
    init = agent.make_network(cfg)
    rb = filled_replay(cfg, agent, spec)
    probe = rb.allocate_batch(256)
    rb.sample(256, np.random.default_rng(1), out=probe)
    probe_obs = torch.as_tensor(probe.as_tensors().obs)
    print("dead at initialisation:", " ".join(f"{k}:{v:.2f}" for k, v in dead_units(init, probe_obs).items()))
    try:
        for run_dir in args.checkpoint or []:
            checkpoint(cfg, agent, run_dir, probe_obs)
        for name in args.variants:
            run(cfg, agent, rb, init, probe_obs, name, *VARIANTS[name], args.updates)
    finally:
        rb.close()
        rb.unlink()


if __name__ == "__main__":
    main()
