"""Replay memory: sampling stacked obs + next-obs vs stable-baselines3 and cpprb, uniform and prioritized; resident bytes.

sample_vs_sb3_speedup(_256): the same Atari-shaped stream (84x84 uint8 frames, stacks of 4, episodes
with zero-padded starts) goes into our memory (each frame once) and into SB3's
ReplayBuffer(optimize_memory_usage=True) holding (4, 84, 84) stacked observations, as SB3 stores them;
both full and wrapped around. SB3's sample() returns new CPU torch tensors (obs, actions, next_obs,
dones, rewards); ours fills a preallocated batch (obs, action, reward, discount, next_obs, index)
whose torch views (Batch.as_tensors) cost nothing per call, and on top checks validity across episode
boundaries and the write head, zero-fills stack starts and runs the seqlock re-check. Best-of-N in
interleaved rounds (other load on the machine hits both alike), one thread each (torch threads = 1
while SB3 samples, so its tensor copies are single-threaded too).

Both sides are bound by memory traffic: per sampled row ours reads 5 frames from DRAM (35 KB, one
run of memory) and writes the 56 KB of obs + next_obs (~110 KB moved); SB3 reads two 28 KB stacks
from DRAM, writes them to new arrays, then copies those into new tensors (~225 KB moved, 56 KB of it
random DRAM reads). On one core that bounds the ratio near 2-2.5x.

sample_vs_cpprb_speedup (the lower of batch 32 and 256): the same stream into cpprb's ReplayBuffer with next_of="obs" and
stack_compress="obs" (its frame de-duplication: each stack stored once, next_obs from the next
index), sampling the same fields, up to what a learner can feed its network: C-contiguous torch
tensors (ours: Batch.as_tensors, views of the batch). cpprb's sample() returns obs and next_obs as
new arrays in a transposed layout (strides (28224, 84, 1, 336) for (B, 4, 84, 84)), so a learner
pays a strided copy on top (np.ascontiguousarray). The *_raw metrics time cpprb's sample() alone,
before that copy.

prioritized_vs_cpprb_speedup: one prioritized sample plus the write-back of new priorities for the
sampled rows, ours (PrioritizedReplay: sum and min trees, stratified draws, importance weights, the
overwritten-slot check) against cpprb's PrioritizedReplayBuffer (same capacity, alpha 0.6, beta 0.4,
next_of and stack_compress as above), both to contiguous tensors as above; the lower of the ratios
at batch 32 and 256 (prioritized_vs_cpprb_speedup_raw: cpprb's sample and update alone).

sample_bandwidth_fraction: the time a sample would take if it only moved its bytes (per row, the
STACK + 1 frames it reads and the 2 x STACK frames of obs + next_obs it writes) at this machine's
single-thread copy bandwidth (np.copyto of 256 MB, measured in the same run), over our sample's time;
the lower of batch 32 and 256. Random 7 KB reads rarely reach a sequential copy's bandwidth, so 1.0 is
out of reach.

*_frames: the same for the shared-frames batch layout (agent.batch_layout; n_step 1): each row is
STACK + 1 frames that obs and next_obs are views of, so a sample writes 5 frames per row instead of 8;
sample_frames_vs_pairs_speedup is its speed-up over the pairs layout (the lower of batch 32 and 256).

bytes_per_transition: a fresh process fills an Atari memory of --rss-capacity slots and reports its
resident-set growth (psutil) divided by the capacity; the shared-memory file's allocated blocks give
the same number from the other side.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np

from gorila_zmq._native import try_load_ext
from gorila_zmq.bench import Report, best_time
from gorila_zmq.replay.memory import ReplayMemory
from gorila_zmq.replay.priority import PrioritizedReplay

DESCRIPTION = __doc__.splitlines()[0]
FRAME = (84, 84)
STACK = 4


def add_arguments(p):
    p.add_argument("--size", type=int, default=100_000,
                   help="transitions in each buffer for the sampling comparison (default 100k: "
                        "SB3 needs 2.8 GB for it, ours 0.7 GB)")
    p.add_argument("--rss-capacity", type=int, default=200_000,
                   help="slots in the memory whose resident size is measured (default 200k, 1.4 GB)")
    p.add_argument("--episode", type=int, default=1000, help="mean episode length")
    p.add_argument("--repeat", type=int, default=9, help="best of this many timings")
    p.add_argument("--no-sb3", action="store_true", help="skip the SB3 baseline")
    p.add_argument("--no-cpprb", action="store_true", help="skip the cpprb baselines")


def _stream(n: int, mean_len: int, seed: int = 0):
    """(frame id per step, episode-start flags, actions, rewards): frames come from a pool of ids."""
    rng = np.random.default_rng(seed)
    frame_ids = rng.integers(0, 1024, size=n + 1)
    start = np.zeros(n + 1, bool)
    i = 0
    while i <= n:
        start[i] = True
        i += 1 + int(rng.integers(mean_len // 2, mean_len * 3 // 2))
    return frame_ids, start, rng.integers(0, 6, size=n + 1), rng.integers(-1, 2, size=n + 1).astype(np.float32)


def _fill_ours(rb: ReplayMemory, pool, frame_ids, start, actions, rewards) -> None:
    n = len(frame_ids)
    for i in range(n):
        if start[i]:
            rb.start_episode(pool[frame_ids[i]])
        else:
            rb.add(actions[i], rewards[i], pool[frame_ids[i]], i + 1 < n and start[i + 1], False)


def _fill_sb3(sb, pool, frame_ids, start, actions, rewards) -> None:
    stack = np.zeros((1, STACK, *FRAME), np.uint8)
    n = len(frame_ids)
    for i in range(n):
        nxt = stack.copy()
        if start[i]:
            nxt[:] = 0
        nxt[0, :-1] = nxt[0, 1:]
        nxt[0, -1] = pool[frame_ids[i]]
        if not start[i]:
            done = i + 1 < n and start[i + 1]
            sb.add(stack, nxt, np.array([actions[i]]), np.array([rewards[i]]), np.array([done], np.float32), [{}])
        stack = nxt


def _fill_cpprb(cb, pool, frame_ids, start, actions, rewards) -> None:
    """cpprb gets the stacked observations SB3 gets (zero-padded at an episode's start)."""
    stack = np.zeros((STACK, *FRAME), np.uint8)
    n = len(frame_ids)
    for i in range(n):
        nxt = stack.copy()
        if start[i]:
            nxt[:] = 0
        nxt[:-1] = nxt[1:]
        nxt[-1] = pool[frame_ids[i]]
        if not start[i]:
            cb.add(obs=stack, act=actions[i], rew=rewards[i], next_obs=nxt, done=float(i + 1 < n and start[i + 1]))
        stack = nxt


def _copy_bandwidth(nbytes: int = 256 << 20, repeat: int = 3) -> float:
    """Bytes moved per second (read + written) by one thread copying a buffer far larger than the
    caches (np.copyto), best of `repeat`."""
    a = np.ones(nbytes, np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)                      # fault the pages in
    best = min(best_time(lambda: np.copyto(b, a), repeat=1, number=1) for _ in range(repeat))
    return 2 * nbytes / best


def _tensors(batch: dict) -> dict:
    """A sampled cpprb batch as the C-contiguous CPU tensors a learner feeds its network."""
    import torch
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def _cpprb_buffers(n: int, pool, stream) -> dict:
    from cpprb import PrioritizedReplayBuffer, ReplayBuffer
    env = {"obs": {"shape": (STACK, *FRAME), "dtype": np.uint8}, "act": {"dtype": np.int64}, "rew": {},
           "done": {}}
    out = {"uniform": ReplayBuffer(n, env, next_of="obs", stack_compress="obs"),
           "prioritized": PrioritizedReplayBuffer(n, env, next_of="obs", stack_compress="obs", alpha=0.6)}
    for cb in out.values():
        _fill_cpprb(cb, pool, *stream)
    return out


def _rss_child(capacity: int, q) -> None:
    import psutil
    proc = psutil.Process()
    pool = np.random.default_rng(1).integers(0, 256, (64, *FRAME), dtype=np.uint8)
    before = proc.memory_info().rss
    rb = ReplayMemory(capacity, frame_shape=FRAME, stack=STACK)
    try:
        rb.start_episode(pool[0])
        for i in range(capacity + 100):          # full, and wrapped around
            end = i % 1000 == 999
            rb.add(i % 6, 1.0, pool[i % 64], end, False)
            if end:
                rb.start_episode(pool[(i * 7) % 64])
        after = proc.memory_info().rss
        path = f"/dev/shm/{rb.name}"
        blocks = os.stat(path).st_blocks * 512 if os.path.exists(path) else -1
        q.put({"rss_growth": after - before, "shm_blocks": blocks, "nbytes": rb.nbytes,
               "capacity": rb.capacity, "bytes_per_slot": rb.bytes_per_slot})
    finally:
        rb.close()
        rb.unlink()


def _measure_rss(capacity: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_rss_child, args=(capacity, q))
    p.start()
    try:
        return q.get(timeout=600)
    finally:
        p.join(60)


def _interleaved(fns: dict, rounds: int, repeat: int) -> dict:
    """Best time of each function, measured in alternating rounds so that load from other processes
    on the machine (which comes and goes) hits every variant alike."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # SB3's tensor copies single-threaded, like our gather
    try:
        best = {k: float("inf") for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                best[k] = min(best[k], best_time(f, repeat=repeat))
        return best
    finally:
        torch.set_num_threads(threads)


def run(args) -> Report:
    rep = Report()
    ext = try_load_ext("replay")
    rep.notes.append(f"replay kernel: {'cython' if ext else 'NOT BUILT: numpy fallback only'}")
    rng = np.random.default_rng(0)
    pool = np.random.default_rng(2).integers(0, 256, (1024, *FRAME), dtype=np.uint8)
    n = args.size
    frame_ids, start, actions, rewards = _stream(n + n // 50, args.episode)

    t0 = time.perf_counter()
    rb = ReplayMemory(n, frame_shape=FRAME, stack=STACK, impl="cython" if ext else "numpy")
    _fill_ours(rb, pool, frame_ids, start, actions, rewards)
    rep.row("fill ours", (time.perf_counter() - t0) / len(frame_ids) * 1e6, "us/step")
    handles = [rb] + ([ReplayMemory.attach(rb.name, impl="numpy")] if ext else [])
    sb = None
    try:
        fns = {}
        for h in handles:
            for B in (32, 256):
                out = h.allocate_batch(B, pinned=False)
                out.as_tensors()

                def ours_sample(h=h, B=B, out=out):
                    h.sample(B, rng, out=out)
                    return out.as_tensors()
                fns[f"ours ({h.implementation}) sample {B}"] = ours_sample
        for B in (32, 256):         # the shared-frames layout (agent.batch_layout): 5 frames per row
            out = rb.allocate_batch(B, pinned=False, shared_frames=True)
            out.as_tensors()

            def ours_frames(B=B, out=out):
                rb.sample(B, rng, out=out)
                return out.as_tensors()
            fns[f"ours ({rb.implementation}) sample {B}, shared frames"] = ours_frames
        if not args.no_sb3:
            from gymnasium import spaces
            from stable_baselines3.common.buffers import ReplayBuffer
            t0 = time.perf_counter()
            sb = ReplayBuffer(n, spaces.Box(0, 255, (STACK, *FRAME), np.uint8), spaces.Discrete(6),
                              device="cpu", optimize_memory_usage=True, handle_timeout_termination=False)
            _fill_sb3(sb, pool, frame_ids, start, actions, rewards)
            rep.row("fill sb3", (time.perf_counter() - t0) / len(frame_ids) * 1e6, "us/step")
            for B in (32, 256):
                fns[f"sb3 sample {B}"] = lambda B=B: sb.sample(B)
        # prioritized: sample + write-back of new priorities for the sampled rows
        pr = PrioritizedReplay(rb, alpha=0.6, eps=1e-6)
        prng = np.random.default_rng(5)
        for B in (32, 256):
            out = pr.allocate_batch(B, pinned=False)
            td = np.abs(prng.standard_normal(B)).astype(np.float32)

            def ours_prioritized(B=B, out=out, td=td):
                pr.sample(B, rng, out=out, beta=0.4)
                pr.update(out.index, out.position, td)
                return out.as_tensors()
            fns[f"ours prioritized sample+update {B}"] = ours_prioritized
        cbs = {}
        if not args.no_cpprb:
            import importlib.metadata
            t0 = time.perf_counter()
            cbs = _cpprb_buffers(n, pool, (frame_ids, start, actions, rewards))
            rep.row("fill cpprb (both buffers)", (time.perf_counter() - t0) / len(frame_ids) * 1e6, "us/step")
            rep.notes.append(f"cpprb {importlib.metadata.version('cpprb')}: next_of='obs', stack_compress='obs'")
            for B in (32, 256):
                fns[f"cpprb sample {B}"] = lambda B=B: cbs["uniform"].sample(B)
                td = np.abs(prng.standard_normal(B)).astype(np.float32)

                def cpprb_prioritized(B=B, td=td):
                    b = cbs["prioritized"].sample(B, beta=0.4)
                    cbs["prioritized"].update_priorities(b["indexes"], td)
                    return b
                fns[f"cpprb prioritized sample+update {B}"] = cpprb_prioritized
                fns[f"cpprb sample {B} -> tensors"] = lambda B=B: _tensors(cbs["uniform"].sample(B))
                fns[f"cpprb prioritized sample+update {B} -> tensors"] = lambda f=cpprb_prioritized: _tensors(f())
        t = _interleaved(fns, rounds=3, repeat=max(1, args.repeat // 3))
        for k, v in t.items():
            rep.row(k, v * 1e6, "us")
        main = "cython" if ext else "numpy"
        if cbs:
            for B in (32, 256):
                ours = t[f"ours ({main}) sample {B}"]
                for raw in ("", " -> tensors"):
                    rep.row(f"sample vs cpprb{raw}, batch {B}", t[f"cpprb sample {B}{raw}"] / ours, "x")
            for raw, key in (("", "sample_vs_cpprb_speedup_raw"), (" -> tensors", "sample_vs_cpprb_speedup")):
                rep.metrics[key] = min(t[f"cpprb sample {B}{raw}"] / t[f"ours ({main}) sample {B}"] for B in (32, 256))
            for B in (32, 256):
                for raw in ("", " -> tensors"):
                    rep.row(f"prioritized vs cpprb{raw}, batch {B}",
                            t[f"cpprb prioritized sample+update {B}{raw}"] / t[f"ours prioritized sample+update {B}"], "x")
            for raw, key in (("", "prioritized_vs_cpprb_speedup_raw"), (" -> tensors", "prioritized_vs_cpprb_speedup")):
                rep.metrics[key] = min(t[f"cpprb prioritized sample+update {B}{raw}"]
                                       / t[f"ours prioritized sample+update {B}"] for B in (32, 256))
        # the bound: what a sampled row must move (its unique frames read, obs + next_obs written)
        # at the copy bandwidth of this machine, one thread, measured now
        fb = int(np.prod(FRAME))
        read, write = (STACK + 1) * fb, 2 * STACK * fb          # n_step 1: obs and next_obs share STACK - 1
        bw = _copy_bandwidth()
        rep.row("copy bandwidth, one thread (read + write)", bw / 1e9, "GB/s", "np.copyto of 256 MB")
        rep.row("bytes per sampled row: frames read / batch written", read, "B", f"{write:,} B written (obs + next_obs)")
        fractions = []
        for B in (32, 256):
            bound = B * (read + write) / bw
            rep.row(f"bandwidth bound, batch {B}", bound * 1e6, "us")
            fractions.append(bound / t[f"ours ({main}) sample {B}"])
            rep.row(f"ours / bound, batch {B}", fractions[-1], "x", "fraction of the bound reached")
        rep.metrics["sample_bandwidth_fraction"] = min(fractions)
        rep.metrics["bytes_written_per_row"] = write
        # the shared-frames layout: a row of STACK + 1 frames, obs and next_obs views of it
        write_f = (STACK + 1) * fb
        rep.row("bytes per sampled row, shared frames: frames read / batch written", read, "B",
                f"{write_f:,} B written (one row of {STACK + 1} frames)")
        fr_f, speed = [], []
        for B in (32, 256):
            tf = t[f"ours ({main}) sample {B}, shared frames"]
            fr_f.append(B * (read + write_f) / bw / tf)
            speed.append(t[f"ours ({main}) sample {B}"] / tf)
            rep.row(f"shared frames / pairs, batch {B}", speed[-1], "x", "speed-up of the sample")
            rep.row(f"ours shared frames / bound, batch {B}", fr_f[-1], "x", "fraction of its bound reached")
            if cbs:
                rep.row(f"sample vs cpprb -> tensors, shared frames, batch {B}", t[f"cpprb sample {B} -> tensors"] / tf, "x")
        rep.metrics["bytes_written_per_row_frames"] = write_f
        rep.metrics["sample_frames_vs_pairs_speedup"] = min(speed)
        rep.metrics["sample_bandwidth_fraction_frames"] = min(fr_f)
        if cbs:
            rep.metrics["sample_vs_cpprb_speedup_frames"] = min(t[f"cpprb sample {B} -> tensors"]
                                                                / t[f"ours ({main}) sample {B}, shared frames"]
                                                                for B in (32, 256))
        cbs.clear()
        if sb is not None:
            rep.metrics["sample_vs_sb3_speedup"] = t["sb3 sample 32"] / t[f"ours ({main}) sample 32"]
            rep.metrics["sample_vs_sb3_speedup_256"] = t["sb3 sample 256"] / t[f"ours ({main}) sample 256"]
            if ext:
                for B in (32, 256):
                    rep.row(f"numpy fallback vs sb3, batch {B}",
                            t[f"sb3 sample {B}"] / t[f"ours (numpy) sample {B}"], "x")
            sb3_bytes = (sb.observations.nbytes + sb.actions.nbytes + sb.rewards.nbytes
                         + sb.dones.nbytes + sb.timeouts.nbytes) / n
            rep.row("sb3 bytes per transition (array sizes)", sb3_bytes, "B")
    finally:
        del sb
        for h in handles[1:]:
            h.close()
        rb.close()
        rb.unlink()

    m = _measure_rss(args.rss_capacity)
    cap = m["capacity"]
    rep.row("rss growth / capacity", m["rss_growth"] / cap, "B", f"{cap:,} slots, filled and wrapped")
    if m["shm_blocks"] >= 0:
        rep.row("shm file allocated / capacity", m["shm_blocks"] / cap, "B")
    rep.row("layout bytes / capacity", m["nbytes"] / cap, "B", f"frame + action + reward + flags = "
            f"{m['bytes_per_slot']} B per slot")
    rep.metrics["bytes_per_transition"] = m["rss_growth"] / cap
    rep.notes.append("1 M Atari transitions: "
                     f"{m['bytes_per_slot'] * 1e6 / 1e9:.2f} GB (each episode also stores its first frame)")
    return rep
