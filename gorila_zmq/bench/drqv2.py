"""DrQ-v2: one full update through our learner against a single-process torch DrQ-v2, and actor frames/s.

Ours: a Learner (loader thread sampling RGB frame stacks from a shared-memory replay, augmentation,
critic + actor gradients as one flat vector, push to a real shard process that applies Adam,
parameter refresh from the subscriber before every update, critic-target soft update).
Reference: the update as the paper's code does it in one process on tensors already in memory
(random shift, critic loss -> encoder and critic Adam steps, actor loss -> actor Adam step, soft
update). Same device, batch, networks and torch threads, same run.

Actor frames/s: a DeepMind Control task stepped with the policy's noisy action (what an actor does
per step, less the replay write), with default rendering and with fast rendering (no shadows, no
multisampling). Frames count the action repeat, as the paper does.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time

import numpy as np
import torch

from gorila_zmq import config as C
from gorila_zmq.net import topology
from gorila_zmq.agents.drqv2 import learning as D
from gorila_zmq.bench import Report
from gorila_zmq.bench.learner import learner_pipeline
from gorila_zmq.agents.base import build_network

DESCRIPTION = __doc__.splitlines()[0]


def add_arguments(p):
    p.add_argument("--updates", type=int, default=12, help="timed updates per side")
    p.add_argument("--batch", type=int, default=256, help="minibatch (the paper: 256)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    p.add_argument("--device", default="auto")
    p.add_argument("--task", default="cartpole_swingup")
    p.add_argument("--env-steps", type=int, default=300, help="agent steps per rendering mode")
    p.add_argument("overrides", nargs="*", help="extra section.field=value for the pipeline's config "
                                                "(e.g. ps.shards=4 ps.apply_threads=0 on a many-core GPU host)")


def _reference(cfg, device, B, n) -> float:
    """The paper's update in one process: three Adam optimisers, tensors already on the device."""
    agent = build_network(cfg).to(device)
    critic_target = copy.deepcopy(agent.critic).requires_grad_(False)
    lr = cfg.ps.lr
    enc_opt = torch.optim.Adam(agent.encoder.parameters(), lr=lr)
    critic_opt = torch.optim.Adam(agent.critic.parameters(), lr=lr)
    actor_opt = torch.optim.Adam(agent.actor.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (B, 9, 84, 84), dtype=torch.uint8, generator=g).to(device)
    nxt = torch.randint(0, 256, (B, 9, 84, 84), dtype=torch.uint8, generator=g).to(device)
    act = (torch.rand(B, cfg.model.action_dim, generator=g) * 2 - 1).to(device)
    rew = torch.rand(B, 1, generator=g).to(device)
    disc = torch.full((B, 1), 0.99 ** 3, device=device)
    std, clip = 0.2, cfg.drqv2.std_clip

    def one():
        o = agent.encoder(D.random_shift(obs))
        with torch.no_grad():
            nh = agent.encoder(D.random_shift(nxt))
        closs, _ = D.update_critic(agent, critic_target, o, act, rew, disc, nh, std, clip)
        enc_opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)
        closs.backward()
        critic_opt.step()
        enc_opt.step()
        aloss, _ = D.update_actor(agent, o, std, clip, cfg.drqv2.actor_pretanh_reg)    # as the learner
        actor_opt.zero_grad(set_to_none=True)
        aloss.backward()
        actor_opt.step()
        D.soft_update(critic_target, agent.critic, cfg.drqv2.critic_tau)
    for _ in range(2):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _filled_replay(n_actions: int, capacity: int = 3_000):
    from gorila_zmq.replay.memory import ReplayMemory
    rb = ReplayMemory(capacity, frame_shape=(3, 84, 84), stack=3, dtype=np.uint8, n_step=3,
                      action_shape=(n_actions,), action_dtype=np.float32, stack_padding="repeat", full_windows=True)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (32, 3, 84, 84), dtype=np.uint8)
    rb.start_episode(frames[0])
    for t in range(capacity - 1):
        end = t % 500 == 499                      # DMC: 500 agent steps, ended by the time limit
        rb.add(rng.uniform(-1, 1, n_actions).astype(np.float32), float(rng.random()), frames[t % 32], False, end)
        if end:
            rb.start_episode(frames[(t + 1) % 32])
    return rb


def _actor_fps(cfg, task: str, fast: bool, steps: int) -> float:
    from gorila_zmq.envs.dmc import DMCEnv
    env = DMCEnv(task, action_repeat=cfg.env.action_repeat, fast_render=fast, seed=0)
    model = build_network(cfg)
    gen = torch.Generator().manual_seed(0)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        obs, *_ = env.step(env.action_space.sample())
    t0 = time.perf_counter()
    for _ in range(steps):
        a = model.act(torch.from_numpy(obs)[None], 0.2, explore=True, generator=gen)[0].numpy()
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            obs, _ = env.reset()
    dt = time.perf_counter() - t0
    env.close()
    return steps * cfg.env.action_repeat / dt


def run(args) -> Report:
    rep = Report()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    tmp = tempfile.mkdtemp(prefix="gz-bench-drqv2-")
    cfg = C.load(None, [f"env.name={args.task}", f"run.run_dir={tmp}/run",
                        f"net.base_port={topology.free_base_port()}", f"agent.batch_size={args.batch}",
                        f"agent.device={args.device}", f"agent.torch_threads={threads}",
                        "ps.checkpoint_interval_s=0", "ps.max_staleness=1000", "agent.learning_starts=100",
                        *args.overrides],
                 preset="drqv2")
    from gorila_zmq.agents.base import prepare
    from gorila_zmq.roles.learner import pick_device
    prepare(cfg)
    device = pick_device(args.device)
    print(f"  reference single-process DrQ-v2 update ({device}, batch {args.batch}, {threads} threads) ...",
          flush=True)
    ref = _reference(cfg, device, args.batch, args.updates)
    print("  gorila-zmq learner pipeline ...", flush=True)
    ours, detail = learner_pipeline(cfg, _filled_replay(cfg.model.action_dim), args.updates,
                                    warmup=2, flush_s=60.0)
    ref2 = _reference(cfg, device, args.batch, args.updates)     # again: the box may have changed pace
    ref = max(ref, ref2)
    rep.row("reference torch DrQ-v2 update (3 Adams in process)", ref, "updates/s", f"best of 2 runs, {device}")
    rep.row("gorila-zmq learner (replay+aug+push+Adam shard+refresh)", ours, "updates/s")
    for k, v in detail.items():
        rep.row(f"  {k}", v, "")
    rep.metrics["update_vs_reference_ratio"] = ours / ref
    torch.set_num_threads(1)                        # an actor process runs one torch thread
    for fast in (False, True):
        print(f"  actor stepping {args.task}, {'fast' if fast else 'default'} rendering ...", flush=True)
        fps = _actor_fps(cfg, args.task, fast, args.env_steps)
        name = "actor_frames_per_s_fast_render" if fast else "actor_frames_per_s_default_render"
        rep.row(name.replace("_", " "), fps, "frames/s", f"action repeat {cfg.env.action_repeat}, MUJOCO_GL="
                + os.environ.get("MUJOCO_GL", "egl"))
        rep.metrics[name] = fps
    rep.metrics["fast_render_speedup"] = rep.metrics["actor_frames_per_s_fast_render"] / \
        rep.metrics["actor_frames_per_s_default_render"]
    rep.notes.append(f"device {device}, torch threads {threads}, batch {args.batch}; {cfg.ps.shards} shard(s) on "
                     "the same host" + ("" if device.type == "cuda" else ", competing for the same cores"))
    return rep
