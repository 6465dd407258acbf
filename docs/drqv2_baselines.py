"""Reference returns on cartpole_swingup (action repeat 2, 500 agent steps per episode), 10 episodes
each: uniform random actions, and constant actions 0, +-0.15 and +-1 (the plateau a saturated actor
gives). Same seeds for every policy.

    .venv/bin/python docs/drqv2_baselines.py          # about a minute on one core
"""
import numpy as np

from gorila_zmq.envs.dmc import DMCEnv


def mean_return(env, policy, episodes=10):
    rets = []
    for ep in range(episodes):
        env.reset(seed=1000 + ep)
        rng = np.random.default_rng(ep)
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(policy(rng))
            total += r
            done = term or trunc
        rets.append(total)
    return float(np.mean(rets)), float(np.min(rets)), float(np.max(rets))


def main():
    env = DMCEnv("cartpole_swingup", action_repeat=2, fast_render=True, seed=0)
    policies = {"uniform random": lambda rng: rng.uniform(-1, 1, 1).astype(np.float32)}
    for c in (0.0, 0.15, -0.15, 1.0, -1.0):
        policies[f"constant {c:+.2f}"] = lambda rng, c=c: np.array([c], np.float32)
    print("| policy | mean return | min | max |\n|---|---:|---:|---:|")
    for name, pol in policies.items():
        m, lo, hi = mean_return(env, pol)
        print(f"| {name} | {m:.1f} | {lo:.0f} | {hi:.0f} |", flush=True)


if __name__ == "__main__":
    main()
