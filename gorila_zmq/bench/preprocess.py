"""`gorila-zmq bench preprocess`: the frame kernel against OpenCV, the env against raw ALE and gymnasium.

Three headline ratios, each measured against its baseline in the same run:
  kernel_vs_cv2_speedup     np.maximum + cv2.resize(INTER_AREA) time / fused kernel time, per frame
  actor_vs_raw_ale_ratio    our env's steps/s / raw ALEInterface steps/s (4 act() calls and the
                            grayscale reads of the last two frames: the floor any env pays)
  actor_vs_gymnasium_speedup our env's steps/s / gymnasium AtariPreprocessing + FrameStackObservation
And E environments with a Nature CNN forward pass per step (the actor's loop), per core:
  actor_vs_envpool_per_core     ours / EnvPool (sync, num_threads = 1 or 2), the lowest over the E and
                                thread counts; actor_vs_ale_vector_per_core: the same against ale-py's
                                AtariVectorEnv. On 2 threads ours is 2 actor processes of E/2 envs.
Ours is make_atari(game), the training protocol (30 no-op starts, FIRE on reset, life-loss
terminals, clipped rewards). Every env variant plays the same game with the same seeded random
actions for the same number of steps, episode resets included (seeding, which reloads the ROM, is
not timed); rounds alternate between variants, each keeps its best round (kernels likewise), which
damps the noise of a shared machine.
"""
from __future__ import annotations

import time

import numpy as np

from gorila_zmq.bench import Report, best_time

DESCRIPTION = ("Frame preprocessing kernel vs cv2, the Atari env vs raw ALE and gymnasium wrappers, and E envs "
               "with inference vs EnvPool and ale-py's vector env.")


def add_arguments(parser) -> None:
    parser.add_argument("--game", default="pong", help="ROM for the env comparisons (default pong)")
    parser.add_argument("--steps", type=int, default=4000, help="agent steps per env variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per env variant (best is kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random actions and the envs")
    parser.add_argument("--no-vector", action="store_true",
                        help="skip the E-environment comparison with inference (EnvPool, ale-py's vector env)")


def _real_frames(game: str, seed: int, n: int = 4) -> list[tuple]:
    """(gray_a, gray_b, rgb_a, rgb_b): consecutive screens from seeded random play."""
    import ale_py
    from gorila_zmq.envs.atari import resolve_game
    from ale_py import roms
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", seed)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(str(roms.get_rom_path(resolve_game(game))))
    acts = ale.getMinimalActionSet()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        for _ in range(int(rng.integers(1, 8))):
            ale.act(acts[int(rng.integers(len(acts)))])
        a, ra = ale.getScreenGrayscale(), ale.getScreenRGB()
        ale.act(acts[int(rng.integers(len(acts)))])
        out.append((a, ale.getScreenGrayscale(), ra, ale.getScreenRGB()))
        if ale.game_over():
            ale.reset_game()
    return out


def _kernel_section(rep: Report, game: str, seed: int, rounds: int) -> None:
    import cv2

    from gorila_zmq.envs import frame
    from gorila_zmq._native import try_load_ext
    # A few real pairs: they stay in cache, as the env's freshly read screens do (the kernels are
    # data-oblivious, so which frames matters little).
    frames = _real_frames(game, seed)
    out = np.empty((84, 84), np.uint8)
    pooled = np.empty((210, 160), np.uint8)
    gray = np.empty((210, 160), np.uint8)
    pooled_rgb = np.empty((210, 160, 3), np.uint8)

    def cv2_gray(a, b, ra, rb):
        cv2.resize(np.maximum(a, b, out=pooled), (84, 84), dst=out, interpolation=cv2.INTER_AREA)

    def cv2_rgb(a, b, ra, rb):
        cv2.cvtColor(np.maximum(ra, rb, out=pooled_rgb), cv2.COLOR_RGB2GRAY, dst=gray)
        cv2.resize(gray, (84, 84), dst=out, interpolation=cv2.INTER_AREA)

    cases = {"cv2": cv2_gray, "numpy": lambda a, b, ra, rb: frame.max_resize_numpy(a, b, out),
             "cv2_rgb": cv2_rgb}
    ext = try_load_ext("frame")
    if ext is not None:
        kern = frame._kernel((210, 160), (84, 84))
        stack = frame.FrameStack(impl="cython")
        stack.prev[...], stack.last[...] = frames[0][0], frames[0][1]
        cases.update(
            kernel=lambda a, b, ra, rb: kern.max_resize(a, b, out),
            wrapper=lambda a, b, ra, rb: frame.max_resize(a, b, out),
            push=lambda a, b, ra, rb: stack.push(True),
            kernel_rgb=lambda a, b, ra, rb: kern.max_resize_rgb(ra, rb, out))
    else:
        rep.notes.append("compiled frame kernel not built: only the NumPy fallback was measured")

    def run_all(fn):
        for f in frames:
            fn(*f)

    t = {k: float("inf") for k in cases}
    for _ in range(rounds):                 # alternate, keep each one's best
        for k, fn in cases.items():
            t[k] = min(t[k], best_time(lambda: run_all(fn), repeat=3) / len(frames))
    us = "us/frame"
    rep.row("cv2: np.maximum + cv2.resize INTER_AREA", t["cv2"] * 1e6, us)
    if ext is not None:
        rep.row("fused kernel (compiled call)", t["kernel"] * 1e6, us)
        rep.row(f"frame.max_resize (validating wrapper, {frame.IMPLEMENTATION})", t["wrapper"] * 1e6, us)
        rep.row("FrameStack.push (the env's path: + mirror write)", t["push"] * 1e6, us)
        rep.metrics["kernel_vs_cv2_speedup"] = t["cv2"] / t["kernel"]
        rep.metrics["kernel_wrapper_vs_cv2_speedup"] = t["cv2"] / t["wrapper"]
    rep.row("NumPy fallback max_resize_numpy", t["numpy"] * 1e6, us)
    rep.metrics["numpy_fallback_vs_cv2_speedup"] = t["cv2"] / t["numpy"]
    rep.row("cv2 RGB: max + cvtColor RGB2GRAY + resize", t["cv2_rgb"] * 1e6, us)
    if ext is not None:
        rep.row("fused kernel RGB (max, luminance, resize)", t["kernel_rgb"] * 1e6, us)
        rep.metrics["kernel_rgb_vs_cv2_speedup"] = t["cv2_rgb"] / t["kernel_rgb"]
        rep.notes.append(f"kernel SIMD: {ext.SIMD} (+ AVX2 clones where CPU and toolchain have "
                         f"them); cv2 {cv2.__version__}")


# -- env throughput -----------------------------------------------------------------------------

def _raw_ale(game: str, seed: int):
    import ale_py
    from ale_py import roms

    from gorila_zmq.envs.atari import resolve_game
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", seed)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(str(roms.get_rom_path(resolve_game(game))))
    acts = ale.getMinimalActionSet()
    b0 = np.empty((210, 160), np.uint8)
    b1 = np.empty((210, 160), np.uint8)

    def run(actions):
        ale.reset_game()
        for a in actions:
            act = acts[a]
            ale.act(act)
            ale.act(act)
            ale.act(act)
            ale.getScreenGrayscale(b0)
            ale.act(act)
            ale.getScreenGrayscale(b1)
            if ale.game_over():
                ale.reset_game()
    return run


def _stepper(env):
    """A timed loop over a gymnasium env: the same for ours and the baseline."""
    def run(actions):
        env.reset()
        step = env.step
        for a in actions:
            _, _, term, trunc, _ = step(a)
            if term or trunc:
                env.reset()
    return run


def _ours(game: str, seed: int, impl: str | None):
    from gorila_zmq.envs.atari import make_atari
    env = make_atari(game, frame_impl=impl)
    env.reset(seed=seed)            # seeding reloads the ROM (~70 ms): kept out of the timing
    return _stepper(env)


def _gymnasium(game: str, seed: int):
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    from gorila_zmq.envs.atari import resolve_game
    gym.register_envs(ale_py)
    env_id = "ALE/" + "".join(p.capitalize() for p in resolve_game(game).split("_")) + "-v5"
    env = FrameStackObservation(AtariPreprocessing(
        # obs_type="grayscale": AtariPreprocessing reads the screen itself, so the inner env's own
        # observation is thrown away each frame; grayscale is the cheapest (the fair setting)
        gym.make(env_id, frameskip=1, repeat_action_probability=0.0, obs_type="grayscale"), frame_skip=4, noop_max=30,
        screen_size=84, grayscale_obs=True), 4)
    env.reset(seed=seed)
    return _stepper(env)


def _env_section(rep: Report, game: str, steps: int, rounds: int, seed: int) -> None:
    from gorila_zmq._native import try_load_ext
    from gorila_zmq.envs.atari import make_atari
    n_actions = make_atari(game).action_space.n
    actions = [int(a) for a in np.random.default_rng(seed).integers(0, n_actions, steps)]
    variants = {"raw ALE (4 act + 2 gray reads)": _raw_ale(game, seed)}
    if try_load_ext("frame") is not None:
        variants["ours: AtariEnv (fused kernel)"] = _ours(game, seed, "cython")
    variants["ours: AtariEnv (NumPy fallback)"] = _ours(game, seed, "numpy")
    try:
        variants["gymnasium AtariPreprocessing + FrameStack"] = _gymnasium(game, seed)
    except Exception as e:      # a missing optional dependency (opencv) only drops the baseline
        rep.notes.append(f"gymnasium baseline unavailable: {type(e).__name__}: {e}")
    for run in variants.values():           # warm-up, untimed
        run(actions[:200])
    best = {k: float("inf") for k in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run(actions)
            best[name] = min(best[name], time.perf_counter() - t0)
    rate = {k: steps / v for k, v in best.items()}
    for name, r in rate.items():
        rep.row(name, r, "steps/s", f"{game}, {steps} steps, best of {rounds}")
    ours = rate.get("ours: AtariEnv (fused kernel)", rate["ours: AtariEnv (NumPy fallback)"])
    rep.metrics["actor_vs_raw_ale_ratio"] = ours / rate["raw ALE (4 act + 2 gray reads)"]
    if "gymnasium AtariPreprocessing + FrameStack" in rate:
        rep.metrics["actor_vs_gymnasium_speedup"] = ours / rate["gymnasium AtariPreprocessing + FrameStack"]
    rep.metrics["numpy_actor_vs_raw_ale_ratio"] = (rate["ours: AtariEnv (NumPy fallback)"]
                                                   / rate["raw ALE (4 act + 2 gray reads)"])


# -- E environments with batched inference: ours (the actor's VecEnv), EnvPool, ale-py's vector env --

def _policy(n_actions: int, seed: int):
    """The actor's per-step work besides stepping: a Nature CNN forward pass over the E observations
    (its argmax computed, then random actions taken, so every variant plays the same way)."""
    import torch
    from gorila_zmq.agents.dqn.networks import NatureCNN
    torch.manual_seed(seed)
    net = NatureCNN((4, 84, 84), n_actions).eval()
    rng = np.random.default_rng(seed)

    def act(obs):
        with torch.no_grad():
            net(torch.from_numpy(np.asarray(obs))).argmax(1)
        return rng.integers(0, n_actions, len(obs))
    return act


def _ours_vec(game: str, E: int, seed: int):
    from gorila_zmq.envs import VecEnv
    from gorila_zmq.envs.atari import make_atari
    vec = VecEnv([make_atari(game, seed=seed + e) for e in range(E)], True)
    return _vector_loop(lambda a: vec.step(a).obs, vec.reset(seed=seed)[0], _policy(vec.envs[0].action_space.n, seed))


def _vector_loop(step, obs, act):
    """run(vsteps): act on the E observations, step all E, `vsteps` times, carrying on from the last call."""
    state = {"obs": obs}

    def run(vsteps):
        o = state["obs"]
        for _ in range(vsteps):
            o = step(act(o))
        state["obs"] = o
    return run


def _envpool_vec(game: str, E: int, T: int, seed: int):
    import envpool
    from gorila_zmq.envs.atari import resolve_game
    task = "".join(p.capitalize() for p in resolve_game(game).split("_")) + "-v5"
    env = envpool.make(task, env_type="gymnasium", num_envs=E, batch_size=E, num_threads=T, seed=seed,
                       img_height=84, img_width=84, gray_scale=True, stack_num=4, frame_skip=4, noop_max=30,
                       episodic_life=True, reward_clip=True, repeat_action_probability=0.0,
                       use_fire_reset=True, max_episode_steps=27000)
    return _vector_loop(lambda a: env.step(a)[0], env.reset()[0], _policy(env.action_space.n, seed))


def _ale_vec(game: str, E: int, T: int, seed: int):
    from ale_py.vector_env import AtariVectorEnv
    from gorila_zmq.envs.atari import resolve_game
    env = AtariVectorEnv(resolve_game(game), E, num_threads=T, img_height=84, img_width=84, grayscale=True,
                         stack_num=4, frameskip=4, noop_max=30, episodic_life=True, reward_clipping=True,
                         repeat_action_probability=0.0, use_fire_reset=True)
    return _vector_loop(lambda a: env.step(a)[0], env.reset(seed=seed)[0], _policy(env.single_action_space.n, seed))


def _ours_child(game, E, seed, vsteps, rounds, barrier, q):
    import torch
    torch.set_num_threads(1)
    run = _ours_vec(game, E, seed)
    run(10)
    for _ in range(rounds):
        barrier.wait()
        t0 = time.perf_counter()
        run(vsteps)
        q.put(time.perf_counter() - t0)


def _ours_processes(game: str, E: int, T: int, seed: int, vsteps: int, rounds: int) -> float:
    """Our runtime on T cores: T actor processes of E / T environments each, side by side; the best
    round's wall time (the slower process of the round)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(T), ctx.Queue()
    procs = [ctx.Process(target=_ours_child, args=(game, E // T, seed + 1000 * i, vsteps, rounds, barrier, q))
             for i in range(T)]
    for p in procs:
        p.start()
    times = [q.get(timeout=600) for _ in range(T * rounds)]
    for p in procs:
        p.join(60)
    return min(max(times[i:i + T]) for i in range(0, len(times), T))


def _vector_section(rep: Report, game: str, steps: int, rounds: int, seed: int) -> None:
    """Steps per second per core with inference included, at E in {1, 4, 16} environments on 1
    thread and E in {4, 16} on 2 (EnvPool's and ale-py's worker threads; ours: 2 actor processes)."""
    import torch
    peers = {}
    try:
        import envpool  # noqa: F401
        peers["EnvPool"] = _envpool_vec
    except ImportError:
        rep.notes.append("EnvPool not installed (pip install -e '.[bench]'): its rows are skipped")
    peers["ale-py AtariVectorEnv"] = _ale_vec
    ratios = {}
    for T, Es in ((1, (1, 4, 16)), (2, (4, 16))):
        for E in Es:
            vsteps = max(50, steps // E)
            torch.set_num_threads(T)        # the peers' inference may use the cores their workers idle on
            runs = {name: make(game, E, T, seed) for name, make in peers.items()}
            torch.set_num_threads(1)
            if T == 1:
                runs["ours"] = _ours_vec(game, E, seed)
            for r in runs.values():
                r(10)                       # warm-up
            best = {k: float("inf") for k in runs}
            for _ in range(rounds):
                for name, r in runs.items():
                    torch.set_num_threads(1 if name == "ours" else T)
                    t0 = time.perf_counter()
                    r(vsteps)
                    best[name] = min(best[name], time.perf_counter() - t0)
            torch.set_num_threads(1)
            if T > 1:
                best["ours"] = _ours_processes(game, E, T, seed, vsteps, rounds)
            per_core = {k: E * vsteps / v / T for k, v in best.items()}
            for name in ("ours", *peers):
                rep.row(f"{name}: E={E}, {T} thread(s), with inference", per_core[name], "steps/s/core")
            for name in peers:
                ratios.setdefault(name, []).append(per_core["ours"] / per_core[name])
                rep.row(f"ours / {name}: E={E}, {T} thread(s)", ratios[name][-1], "x")
            del runs
    if "EnvPool" in ratios:
        rep.metrics["actor_vs_envpool_per_core"] = min(ratios["EnvPool"])
    rep.metrics["actor_vs_ale_vector_per_core"] = min(ratios["ale-py AtariVectorEnv"])
    rep.notes.append("actor_vs_*_per_core: the lowest ratio over E in {1, 4, 16} on 1 thread and {4, 16} on 2; "
                     "inference: a Nature CNN forward pass per step over the E observations")


def run(args) -> Report:
    rep = Report()
    _kernel_section(rep, args.game, args.seed, args.rounds)
    _env_section(rep, args.game, args.steps, args.rounds, args.seed)
    if not args.no_vector:
        _vector_section(rep, args.game, args.steps, args.rounds, args.seed)
    return rep
