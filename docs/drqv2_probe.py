"""Probe a DrQ-v2 run's shard checkpoint (cartpole_swingup): the actor's pre-tanh mean z over the 250
states of a random-action episode, the critic's Q there and its preference between the two bounds,
and, for the actor's last layer, the gradient of the paper's actor loss (no pre-tanh term), Adam's
sqrt(v) and the step Adam would take relative to lr. One line per call.

    .venv/bin/python docs/drqv2_probe.py RUN_DIR        # reads RUN_DIR/config.json, RUN_DIR/ckpt/ps0.npz
"""
import sys

import numpy as np
import torch

from gorila_zmq import config as C
from gorila_zmq.roles.ps import load_checkpoint
from gorila_zmq.ps.layout import ParamLayout
from gorila_zmq.agents.base import build_network
from gorila_zmq.envs.dmc import DMCEnv
from gorila_zmq.agents.drqv2 import learning as drqv2
from gorila_zmq.agents.common import schedule
torch.set_num_threads(1)
run = sys.argv[1]
cfg = C.load(run + "/config.json", [])
theta, (m, v), meta = load_checkpoint(run + "/ckpt/ps0.npz")
t = int(meta.get("version"))
model = build_network(cfg)
layout = ParamLayout.from_module(model)
layout.load_into(model, theta)
env = DMCEnv("cartpole_swingup", action_repeat=2, fast_render=True, seed=3)
obs, _ = env.reset(seed=3)
rng = np.random.default_rng(0)
obs_l = []
for i in range(250):
    obs_l.append(obs.copy())
    obs, r, term, trunc, _ = env.step(rng.uniform(-1, 1, 1).astype(np.float32))
O = torch.from_numpy(np.stack(obs_l))
with torch.no_grad():
    h = model.encoder(O.reshape(len(O), -1, 84, 84))
    z = model.actor.pre_tanh(h).squeeze(1)
    q = torch.min(*model.critic(h, torch.tanh(z)[:, None])).squeeze(1)
    # dQ/da at the bound the actor sits on, and at the other one
    qp = torch.min(*model.critic(h, torch.ones(len(O), 1))).squeeze(1)
    qm = torch.min(*model.critic(h, -torch.ones(len(O), 1))).squeeze(1)
std = schedule(cfg.drqv2.std_schedule, t)
model.zero_grad()
loss, _ = drqv2.update_actor(model, h, std, cfg.drqv2.std_clip)
loss.backward()
b1, b2, eps = cfg.ps.adam_beta1, cfg.ps.adam_beta2, cfg.ps.adam_eps
out = [f"v{t}", f"z {z.mean():.2f}±{z.std():.2f} [{z.min():.2f},{z.max():.2f}]", f"Q(s,mu) {q.mean():.2f}",
       f"Q(+1)-Q(-1): mean {(qp-qm).mean():.2f}, >0 in {(qp > qm).float().mean():.2f}"]
for e in layout.entries:
    if e.name.startswith("actor.policy.4.weight"):
        sl = slice(e.offset, e.offset + e.size)
        vh = v[sl] / (1 - b2 ** t); mh = m[sl] / (1 - b1 ** t)
        g = dict(model.named_parameters())[e.name].grad.numpy().ravel()
        nz = g != 0
        if not nz.any():
            out.append(f"{e.name}: every gradient exactly 0")
            continue
        out.append(f"{e.name}: nonzero {nz.mean():.2f}, |g| med {np.median(np.abs(g[nz])):.1e}, "
                   f"sqrt(v) med {np.median(np.sqrt(vh[nz])):.1e}, "
                   f"step/lr med {np.median(np.abs(mh[nz]) / (np.sqrt(vh[nz]) + eps)):.3f}")
print(" | ".join(out))
