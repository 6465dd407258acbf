"""Single-process DrQ-v2 (the paper's training loop: 2,000 uniform seed steps, then one update every 2
agent steps, one torch Adam over encoder+actor+critic, soft critic target) with this repository's
networks, update (gorila_zmq.agents.drqv2.learning.gradients) and replay memory, on cartpole_swingup with fast
rendering. A diagnostic for the distributed run: every 100 updates it prints the actor's pre-tanh
output on 64 fixed states (mean, spread across states, max), the critic's Q and the last training
returns.  Usage: python docs/drqv2_reference_loop.py [BATCH=64] [UPDATES=3000]
Its output of 2026-11-26 (batch 64, at nice 19 beside a Pong run) is docs/drqv2_reference_loop.log."""
import sys, time, numpy as np, torch
from gorila_zmq import config as C
from gorila_zmq.agents.drqv2 import learning as drqv2
from gorila_zmq.agents.common import schedule
from gorila_zmq.envs.dmc import DMCEnv
from gorila_zmq.agents.base import build_network, prepare
from gorila_zmq.replay.memory import ReplayMemory
torch.set_num_threads(1); torch.manual_seed(0)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
N_UPD = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
cfg = C.load(None, ["run.run_dir=/tmp/drqref"], preset="drqv2"); prepare(cfg)
agent = build_network(cfg)
tgt = build_network(cfg).critic; tgt.load_state_dict(agent.critic.state_dict()); tgt.requires_grad_(False)
opt = torch.optim.Adam(agent.parameters(), lr=1e-4)
env = DMCEnv("cartpole_swingup", action_repeat=2, fast_render=True, seed=1)
rb = ReplayMemory(100_000, frame_shape=(3, 84, 84), stack=3, dtype=np.uint8, n_step=3, gamma=0.99,
                  action_shape=(1,), action_dtype=np.float32)
obs, _ = env.reset(seed=1); rb.start_episode(obs[-3:])
rng = np.random.default_rng(0); gen = torch.Generator().manual_seed(0)
probe = []; steps = 0; upd = 0; ep_ret = 0.0; rets = []; t0 = time.time()
out = rb.allocate_batch(B, pinned=False)
while upd < N_UPD:
    if steps < 2000:
        a = rng.uniform(-1, 1, 1).astype(np.float32)
    else:
        std = schedule("linear(1.0,0.1,50000)", upd)
        with torch.no_grad():
            a = agent.act(torch.from_numpy(obs)[None], std, explore=True, generator=gen)[0].numpy()
    obs, r, term, trunc, _ = env.step(a); ep_ret += r; steps += 1
    rb.add(a, float(r), obs[-3:], bool(term), bool(trunc))
    if len(probe) < 64 and steps % 30 == 0:
        probe.append(obs.copy())
    if term or trunc:
        rets.append(ep_ret); ep_ret = 0.0
        obs, _ = env.reset(); rb.start_episode(obs[-3:])
    if steps >= 2000 and steps % 2 == 0:
        std = schedule("linear(1.0,0.1,50000)", upd)
        b = rb.sample(B, rng, out=out); t = b.as_tensors()
        info, ok = drqv2.gradients(agent, tgt, torch.as_tensor(t.obs), torch.as_tensor(t.action).float(),
                                   torch.as_tensor(t.reward), torch.as_tensor(t.discount),
                                   torch.as_tensor(t.next_obs), std, 0.3)
        opt.step(); drqv2.soft_update(tgt, agent.critic, 0.01); upd += 1
        if upd % 100 == 0:
            with torch.no_grad():
                P = torch.from_numpy(np.stack(probe))
                h = agent.encoder(P.reshape(len(P), -1, 84, 84))
                z = agent.actor.policy(agent.actor.trunk(h))
            print(f"upd {upd} steps {steps} t {time.time()-t0:.0f}s pre-tanh mean {z.mean():.3f} std {z.std():.3f} "
                  f"|z|max {z.abs().max():.2f} critic_q {info['critic_q1']:.2f} actor_loss {info['actor_loss']:.2f} "
                  f"last returns {[round(x) for x in rets[-3:]]}", flush=True)
