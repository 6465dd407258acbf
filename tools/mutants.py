"""Mutation testing over the algorithms and the protocol: each mutant below is one semantic change a
careless edit could make (a flipped comparison, a skipped call, swapped arguments, a removed check),
applied to the source, then the fast tier of the tests that cover that module is run; a mutant is
killed when a test fails. Prints each outcome and the kill rate. `make mutants` runs it (about ten
minutes on 2 cores); it is not part of CI.

The mutants are listed by hand, not generated: generated operator mutants (mutmut's) are mostly
equivalent or cosmetic in code like this (log messages, defaults of keyword arguments), and the goal
is that every rule the papers and the README name has a test that notices when it is broken. A
mutant listed with `equivalent=...` is expected to survive, with the reason.

Run it on a clean tree: each mutant is written into the working copy and restored afterwards (also on
Ctrl-C); `--only NAME` runs the mutants whose name contains NAME."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    equivalent: str = ""


M = Mutant
DQN, DRQ, ALG = "tests/test_dqn_units.py", "tests/test_drqv2.py", "tests/test_algorithms.py"
PS, STATE, REPLAY = "tests/test_ps.py", "tests/test_shard_state.py", "tests/test_replay.py"
MUTANTS = [
    # -- the audit's nine ----------------------------------------------------------------------
    M("augmentation off", "gorila_zmq/agents/drqv2/learning.py",
      "obs = random_shift(obs.reshape(B, -1, *obs.shape[-2:]))", "obs = obs.reshape(B, -1, *obs.shape[-2:]).float()",
      (DRQ, ALG)),
    M("policy noise clip removed", "gorila_zmq/agents/drqv2/learning.py",
      "x = mu + (torch.randn_like(mu) * std).clamp(-clip, clip)", "x = mu + torch.randn_like(mu) * std", (DRQ, ALG)),
    M("critic target from the online critic", "gorila_zmq/agents/drqv2/learning.py",
      "target = critic_target(agent, critic_target_net, next_obs_h", "target = critic_target(agent, agent.critic, next_obs_h",
      (DRQ, ALG)),
    M("actor loss on Q1", "gorila_zmq/agents/drqv2/learning.py",
      "q_loss = -torch.min(q1, q2).mean()", "q_loss = -q1.mean()", (DRQ, ALG)),
    M("target never loaded at sync", "gorila_zmq/agents/dqn/agent.py",
      "        self.load_theta(self.target)\n        self.target_syncs += 1", "        self.target_syncs += 1",
      (DQN, ALG)),
    M("outlier filter removed from the learner", "gorila_zmq/roles/learner.py",
      "self.learning.gradients(on_device, global_updates, self.filter.accept)",
      "self.learning.gradients(on_device, global_updates, lambda loss: True)", (DQN, ALG)),
    M("Huber replaced by MSE", "gorila_zmq/agents/dqn/learning.py",
      "loss = F.smooth_l1_loss(q, target) if huber else", "loss = F.mse_loss(q, target) if huber else", (DQN, ALG)),
    M("soft update arguments swapped", "gorila_zmq/agents/drqv2/agent.py",
      "soft_update(self.critic_target, self.online.critic, self.cfg.drqv2.critic_tau)",
      "soft_update(self.online.critic, self.critic_target, self.cfg.drqv2.critic_tau)", (DRQ, ALG)),
    M("evaluator keeps every result as best", "gorila_zmq/roles/evaluator.py",
      'if res["return_mean"] > self.best:', "if True:", (ALG, "tests/test_evaluation.py")),
    # -- the papers' other rules ---------------------------------------------------------------
    M("double DQN evaluates with the online net", "gorila_zmq/agents/dqn/learning.py",
      "q_next = q_next_target.gather(1, best).squeeze(1)", "q_next = q_net(next_obs).gather(1, best).squeeze(1)",
      (DQN, ALG)),
    M("target bootstraps from the online net", "gorila_zmq/agents/dqn/learning.py",
      "q_next_target = target_net(next_obs)", "q_next_target = q_net(next_obs)", (DQN, ALG)),
    M("no discount on the bootstrap", "gorila_zmq/agents/dqn/learning.py",
      "target = reward + discount * q_next", "target = reward + q_next", (DQN, ALG)),
    M("clipped double Q uses the max", "gorila_zmq/agents/drqv2/learning.py",
      "return reward + discount * torch.min(tq1, tq2)", "return reward + discount * torch.max(tq1, tq2)", (DRQ, ALG)),
    M("soft update with 1 - tau", "gorila_zmq/agents/drqv2/learning.py",
      "list(source.parameters()), tau)", "list(source.parameters()), 1 - tau)", (DRQ, ALG)),
    M("epsilon on the local count", "gorila_zmq/agents/dqn/agent.py",
      "return linear_schedule(dqn_cfg.eps_start, end, dqn_cfg.eps_anneal_updates, global_updates)",
      "return linear_schedule(dqn_cfg.eps_start, end, dqn_cfg.eps_anneal_updates, 0)", (DQN,)),
    M("per-actor epsilon exponent off by one", "gorila_zmq/agents/dqn/agent.py",
      "end = dqn_cfg.eps_end ** (1 + 7 * actor_index / (num_actors - 1))",
      "end = dqn_cfg.eps_end ** (7 * actor_index / (num_actors - 1))", (DQN,)),
    M("target sync on every update", "gorila_zmq/agents/common.py",
      "        k = t // self.period\n", "        k = t\n", (DQN, ALG)),
    M("outlier filter never drops", "gorila_zmq/agents/common.py",
      "x > self.mean + self.k * math.sqrt(self.var)", "x > self.mean + 1e9 * self.k * math.sqrt(self.var)", (DQN,)),
    M("outlier filter lets NaN through", "gorila_zmq/agents/common.py",
      "        if not math.isfinite(x):\n            self.dropped += 1\n            return False\n", "", (DQN,)),
    M("AdaGrad without the square", "gorila_zmq/ps/optim.py",
      "    tmp = np.multiply(grad, grad)\n    accum += tmp", "    tmp = np.abs(grad)\n    accum += tmp", (ALG, PS)),
    M("AdaGrad step ascends", "gorila_zmq/ps/optim.py", "    theta -= tmp\n", "    theta += tmp\n", (ALG, PS)),
    M("n-step return without gamma", "gorila_zmq/replay/numpy_core.py", "g = np.where(act, g * self.gamma, g)",
      "g = np.where(act, g, g)", (REPLAY,)),
    M("human normalisation inverted", "gorila_zmq/envs/scores.py",
      "return 100.0 * (score - rnd) / (human - rnd)", "return 100.0 * (score - rnd) / (human + rnd)",
      ("tests/test_evaluation.py",)),
    M("evaluation epsilon ignored", "gorila_zmq/agents/dqn/agent.py",
      "explore = self.rng.random(E) < self.epsilon", "explore = self.rng.random(E) < 0.0",
      (DQN, "tests/test_evaluation.py")),
    # -- the shard -----------------------------------------------------------------------------
    M("count staleness bound off", "gorila_zmq/roles/ps.py",
      "stale = bool((bound and staleness > bound) or", "stale = bool((bound and staleness > 10 * bound) or", (PS,)),
    M("age staleness bound off", "gorila_zmq/roles/ps.py",
      "or (bound_s and age_s > bound_s))", "or (False and age_s > bound_s))", (PS,)),
    M("staleness factor ignored", "gorila_zmq/roles/ps.py",
      "bound = max(bound, self.cfg.ps.staleness_factor * self._age_median)", "bound = bound", (PS,)),
    M("gradients from the future applied", "gorila_zmq/roles/ps.py", "        if staleness < 0:\n",
      "        if staleness < -(1 << 70):\n", (STATE,)),
    M("non-finite gradient applied", "gorila_zmq/roles/ps.py",
      "if not stale and not optim.all_finite(grad):", "if False:", (PS,)),
    M("duplicate push applied again", "gorila_zmq/roles/ps.py", "        if first is not None:\n",
      "        if first is None and False:\n", (PS, STATE)),
    M("forgotten retry applied", "gorila_zmq/ps/state.py",
      "            return P.Status.FORGOTTEN if retry else None", "            return None", (STATE,)),
    M("dedup window too short", "gorila_zmq/ps/state.py", "        if d >= DEDUP_WINDOW:", "        if d >= 1:",
      (STATE,)),
    M("segment never re-adopted", "gorila_zmq/roles/ps.py", "load_run_token(cfg.run.run_dir), adopt=True)",
      "load_run_token(cfg.run.run_dir), adopt=False)", (STATE,)),
    M("torn apply adopted", "gorila_zmq/ps/state.py", "        elif meta[6]:", "        elif False:", (STATE,)),
    M("segment of another run adopted", "gorila_zmq/ps/state.py",
      "int(meta[5]), int(meta[7])) != want:", "int(meta[7])) != want[:4] + want[5:]:", (STATE,)),
    M("unreadable checkpoint silently reset", "gorila_zmq/roles/ps.py",
      'if self.cfg.ps.bad_checkpoint != "initial":', "if False:", (STATE,)),
    # -- the protocol and the replay server ----------------------------------------------------
    M("huge JSON integers converted", "gorila_zmq/net/protocol.py",
      "    if len(text) > _MAX_DIGITS:\n", "    if False:\n", (STATE, "tests/test_replay_service.py"),
      equivalent="defence in depth: without the digit limit, int() refuses past 4,300 digits with a ValueError that "
                 "as_json also turns into BAD_PAYLOAD, and every integer field's range refuses the shorter ones; "
                 "the limit only saves the quadratic conversion of up to 4,300 digits"),
    M("JSON field types unchecked", "gorila_zmq/net/protocol.py",
      "ok = type(v) is f.kind or (f.kind is float and type(v) is int)", "ok = True", (STATE,)),
    M("payload length unchecked", "gorila_zmq/net/protocol.py",
      "    if n != hdr.length:\n", "    if False:\n", (PS, "tests/test_layout_protocol_config.py")),
    M("retry flag never set", "gorila_zmq/net/rpc.py",
      "                p.frames = [P.mark_retry(p.frames[0]), *p.frames[1:]]", "                pass",
      ("tests/test_layout_protocol_config.py", PS)),
    M("replay add changes state before validating", "gorila_zmq/roles/replay.py",
      "        why = self.record.bad_actions(recs[\"action\"])\n",
      "        self.seqs[actor] = (req.incarnation, req.seq)\n        why = self.record.bad_actions(recs[\"action\"])\n",
      ("tests/test_replay_service.py",)),
    M("replay add NaN reward accepted", "gorila_zmq/roles/replay.py",
      'if not np.isfinite(recs["reward"]).all():', "if False:", ("tests/test_replay_service.py",)),
    # -- issue 17: fidelity of the learning setups ----------------------------------------------
    M("replay repeat padding ignored (NumPy)", "gorila_zmq/replay/numpy_core.py",
      "            if self.pad_repeat:                           # before", "            if False:                           # before",
      (REPLAY,)),
    M("replay full windows ignored (NumPy)", "gorila_zmq/replay/numpy_core.py",
      "            if self.full_windows and i < self.nstep:", "            if False:", (REPLAY,)),
    M("DMC stack zero-padded again", "gorila_zmq/envs/dmc.py",
      "        self._frames[:] = self._render()", "        self._frames[:] = 0\n        self._frames[-1] = self._render()",
      ("tests/test_dmc.py",)),
    M("DrQ-v2 samples windows cut short by the time limit", "gorila_zmq/agents/drqv2/agent.py",
      'stack_padding="repeat", full_windows=True)', 'stack_padding="repeat", full_windows=False)', ("tests/test_dmc.py",)),
    M("learner not held by the replay ratio", "gorila_zmq/roles/learner.py",
      "        return allowed is not None and self.updates + self.dropped >= allowed", "        return False", (DQN,)),
    M("evaluation presses FIRE", "gorila_zmq/envs/__init__.py",
      "fire_reset=None if (ev.fire_reset if evaluation else cfg.env.fire_reset) else False", "fire_reset=None",
      ("tests/test_evaluation.py",)),
    M("shared-frames row ends with obs's newest frame (NumPy)", "gorila_zmq/replay/numpy_core.py",
      "rows_out[r, S] = self.frames[lane, (L + 1) % cap]", "rows_out[r, S] = self.frames[lane, L % cap]", (REPLAY,)),
    M("learner's next_obs view is obs", "gorila_zmq/replay/memory.py",
      "    return frames[:, :-1], frames[:, 1:]", "    return frames[:, :-1], frames[:, :-1]", (REPLAY, DQN)),
    M("evaluation record names another seed", "gorila_zmq/roles/evaluator.py",
      "env_frames=self._env_frames(), seed=seed,", "env_frames=self._env_frames(), seed=seed + 1,", (DQN,)),
    M("eval ignores --seed", "gorila_zmq/cli.py",
      "returns = run_episodes(policy, cfg, episodes, a.seed, a.video,", "returns = run_episodes(policy, cfg, episodes, 0, a.video,",
      (DQN,)),
    M("learner waits for window room without bound", "gorila_zmq/roles/learner.py",
      "if not self.pusher.wait_room(timeout_s=0.25):", "if not self.pusher.wait_room(timeout_s=30.0):", (DQN,)),
    M("shard lr ramp off by one update", "gorila_zmq/ps/optim.py",
      "min(1.0, (version + 1) / n)", "min(1.0, version / n)", (ALG,)),
    M("Adam ignores the lr ramp", "gorila_zmq/ps/optim.py",
      "grad, self.lr_at(version), version + 1,", "grad, c.lr, version + 1,", (ALG,)),
    M("limiter counts dropped batches", "gorila_zmq/roles/learner.py",
      "return allowed is not None and self.paced_updates() >= allowed",
      "return allowed is not None and self.updates + self.dropped >= allowed", (DQN,)),
    M("limiter counts refused pushes", "gorila_zmq/roles/learner.py",
      'return self.updates - self.cfg.agent.grads_per_push * (s0["stale"] + s0["rejected"] + s0["lost"])',
      "return self.updates", (DQN,)),
    M("plot --max-frames clips only the axis", "gorila_zmq/plot.py",
      "        runs, references = clip_frames(runs, references, max_frames)\n", "", ("tests/test_plot.py",)),
    M("a resumed evaluator counts from 0", "gorila_zmq/roles/evaluator.py",
      "self.evaluations, self._up_before = self._load_state()", "self.evaluations, self._up_before = 0, 0.0", (DQN,)),
    M("up time not kept at a clean stop", "gorila_zmq/roles/evaluator.py",
      "    def finish(self) -> None:\n        self._save_state()", "    def finish(self) -> None:\n        pass", (DQN,)),
    M("plot's time panel ignores run_seconds", "gorila_zmq/plot.py",
      'clock = "run_seconds" if all(', 'clock = "wall_time" if all(', ("tests/test_plot.py",)),
    M("a same-host push sends its bytes", "gorila_zmq/ps/client.py",
      "            if i in local:", "            if False:", ("tests/test_ps.py", DQN)),
    M("a shard maps any segment a push names", "gorila_zmq/ps/local.py",
      "        if not name.startswith(self.prefix) or not _NAME.match(name):",
      "        if False:", ("tests/test_ps.py",)),
    M("the learner's buffers are not shared memory", "gorila_zmq/roles/learner.py",
      "        if self.pusher.segments is not None:          # a shard", "        if False:          # a shard", (DQN,)),
    M("a shared-memory slice at the wrong offset", "gorila_zmq/ps/client.py",
      "P.shm_ref(seg, 4 * a, b - a)", "P.shm_ref(seg, 0, b - a)", ("tests/test_ps.py",)),
]


def run(m: Mutant, fast_env: dict) -> tuple[str, float]:
    path = os.path.join(ROOT, m.path)
    with open(path) as f:
        src = f.read()
    if src.count(m.old) != 1:
        return f"NOT APPLICABLE (the original text occurs {src.count(m.old)} times)", 0.0
    t0 = time.monotonic()
    try:
        with open(path, "w") as f:
            f.write(src.replace(m.old, m.new))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                                *m.tests], cwd=ROOT, env=fast_env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:          # a mutant that hangs a test is noticed too (mutmut's rule)
            return "killed", time.monotonic() - t0
        killed = r.returncode not in (0, 5)
        outcome = "killed" if killed else "SURVIVED" if r.returncode == 0 else "NO TESTS RAN"
    finally:
        with open(path, "w") as f:
            f.write(src)
    return outcome, time.monotonic() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="run the mutants whose name contains this")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not a.only or a.only in m.name]
    if a.list:
        for m in chosen:
            print(f"{m.name:<45} {m.path}")
        return 0
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *sorted({m.path for m in chosen})], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        print(f"mutants: uncommitted changes in the files it mutates; commit or stash them first:\n{dirty}")
        return 2
    env = dict(os.environ, GORILA_PUREPYTHON="1")     # the NumPy twins: the Python source is what is mutated
    killed = survived = 0
    for k, m in enumerate(chosen, 1):
        outcome, dt = run(m, env)
        ok = outcome == "killed"
        killed += ok
        survived += outcome == "SURVIVED"
        note = f"  (equivalent: {m.equivalent})" if m.equivalent and not ok else ""
        print(f"[{k:2d}/{len(chosen)}] {outcome:<9} {dt:5.1f}s  {m.name}  ({m.path}){note}", flush=True)
    equivalent = sum(1 for m in chosen if m.equivalent)
    semantic = len(chosen) - equivalent
    rate = killed / semantic if semantic else 1.0
    print(f"\nkilled {killed} of {semantic} semantic mutants: kill rate {rate:.1%} ({survived} survived, "
          f"{equivalent} listed as equivalent)")
    return 0 if rate >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
