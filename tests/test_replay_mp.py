"""One writer process and two reader processes hammering one replay memory (spawn).

Every frame the writer stores encodes (lane, episode, step) in its first bytes and fills the rest with
a value derived from them, and rewards, actions and episode lengths are functions of (episode, step):
a reader checks each sampled row completely (every frame of both stacks, whole frames, action,
n-step return, discount) without seeing the writer. The ring is small so the writer laps it many
times while readers gather. With the seqlock re-check switched off (the negative control) the same
readers must see corrupt rows, which shows the positive test exercises the race.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from gorila_zmq._native import pure_python
from gorila_zmq.replay.memory import ReplayMemory
from gorila_zmq.replay.priority import PrioritizedReplay

IMPLS = ["numpy"] if pure_python() else ["cython", "numpy"]
SHAPE = (84, 84)
BATCH = 32
STACK, NSTEP, GAMMA, LANES, LANE_CAP = 4, 3, 0.9, 2, 128


def ep_length(ep: int) -> int:
    return 3 + (ep * 7919) % 29


def ep_end(ep: int) -> str:
    return ("terminated", "truncated", "abandoned")[ep % 3]


def reward(ep: int, t: int) -> float:
    return float((ep * 31 + t) % 11 - 5)


def action(ep: int, t: int) -> int:
    return (ep + t) % 6


def body(lane: int, ep: int, t: int) -> int:
    return (ep * 131 + t * 7 + lane * 17) % 255 + 1


def frame(lane: int, ep: int, t: int) -> np.ndarray:
    f = np.full(SHAPE, body(lane, ep, t), np.uint8)
    f[0, :5] = (lane, ep & 255, ep >> 8, t & 255, t >> 8)
    return f


def decode(frames: np.ndarray):
    """(lane, ep, t, ok) arrays for frames (..., *SHAPE); ok is False for a torn frame (its body does
    not match its header); zero frames decode to lane = ep = t = -1."""
    flat = frames.reshape(*frames.shape[:-2], -1)
    h = flat[..., :5].astype(np.int64)
    lane, ep, t = h[..., 0], h[..., 1] | h[..., 2] << 8, h[..., 3] | h[..., 4] << 8
    zero = ~flat.any(axis=-1)
    ok = zero | (flat[..., 5:] == body(lane, ep, t)[..., None].astype(np.uint8)).all(axis=-1)
    return np.where(zero, -1, lane), np.where(zero, -1, ep), np.where(zero, -1, t), ok


def check_batch(b) -> list[str]:
    """Every problem in a sampled batch (an empty list when all rows are right)."""
    problems = []
    obs, nxt = decode(b.obs), decode(b.next_obs)
    for i in range(len(b)):
        if not (obs[3][i].all() and nxt[3][i].all()):
            problems.append(f"row {i}: torn frame")
            continue
        lane, ep, t = (int(a[i, -1]) for a in obs[:3])
        if ep < 0:
            problems.append(f"row {i}: newest obs frame is zeros")
            continue
        n = ep_length(ep)
        k = min(NSTEP, n - t)
        if b.index[i] // LANE_CAP != lane or k < 1:
            problems.append(f"row {i}: index {b.index[i]} for lane {lane}, t={t} of {n}")
            continue
        for name, code, top in (("obs", obs, t), ("next_obs", nxt, t + k)):
            tt = top - (STACK - 1 - np.arange(STACK))
            want = np.where(tt < 0, -1, np.stack([np.full(STACK, lane), np.full(STACK, ep), tt]))
            got = np.stack([code[0][i], code[1][i], code[2][i]])
            if not (got == want).all():
                problems.append(f"row {i}: {name} frames {got.T.tolist()}, want {want.T.tolist()}")
                break
        else:
            ret = sum(GAMMA ** j * reward(ep, t + 1 + j) for j in range(k))
            disc = 0.0 if (t + k == n and ep_end(ep) == "terminated") else GAMMA ** k
            if (b.action[i] != action(ep, t + 1) or not np.isclose(b.reward[i], ret, rtol=1e-5, atol=1e-5)
                    or not np.isclose(b.discount[i], disc)):
                problems.append(f"row {i}: action/reward/discount {b.action[i]}/{b.reward[i]}/"
                                f"{b.discount[i]}, want {action(ep, t + 1)}/{ret}/{disc}")
    return problems


def writer(name, impl, stop, steps_out):
    rb = ReplayMemory.attach(name, impl=impl)
    ep = [lane for lane in range(LANES)]          # lane l writes episodes l, l + LANES, ...
    t = [0] * LANES
    for lane in range(LANES):
        rb.start_episode(frame(lane, ep[lane], 0), lane)
    steps = 0
    while not stop.is_set() and max(ep) < 60_000:          # episode ids fit in 16 bits
        for lane in range(LANES):
            e = ep[lane]
            if t[lane] == ep_length(e):                  # episode over: next one
                ep[lane] = e = e + LANES
                t[lane] = 0
                rb.start_episode(frame(lane, e, 0), lane)  # an "abandoned" one gets truncated here
                continue
            t[lane] += 1
            s = t[lane]
            last = s == ep_length(e)
            rb.add(action(e, s), reward(e, s), frame(lane, e, s),
                   last and ep_end(e) == "terminated", last and ep_end(e) == "truncated", lane)
            steps += 1
    steps_out.value = steps
    rb.close()


def reader(name, impl, detect, seconds, seed, results, prioritized=False):
    rb = ReplayMemory.attach(name, impl=impl)
    rb._detect_torn = detect
    rng = np.random.default_rng(seed)
    pr = PrioritizedReplay(rb, impl=impl) if prioritized else None
    out = pr.allocate_batch(BATCH, pinned=False) if pr else rb.allocate_batch(BATCH, pinned=False)
    rows = errors = empty = 0
    first = None
    deadline = time.monotonic() + 60
    while rb.stats()["frames_written"] < 2 * LANES * LANE_CAP and time.monotonic() < deadline:
        time.sleep(0.001)                 # start once the writer has wrapped around
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        try:
            if pr is None:
                rb.sample(BATCH, rng, out=out)
            else:                         # sample by priority, then write new priorities back
                pr.sample(BATCH, rng, out=out, beta=0.5)
                pr.update(out.index, out.position, rng.gamma(1.0, size=BATCH))
        except ValueError:                # nothing valid yet
            empty += 1
            continue
        problems = check_batch(out)
        rows += BATCH
        errors += len(problems)
        first = first or (problems[0] if problems else None)
    results.put((rows, errors, first, rb.stats()["torn_redraws"], empty,
                 pr.counters["stale_priorities"] if pr else 0))
    rb.close()


def hammer(impl, detect, seconds=1.5, prioritized=False):
    ctx = mp.get_context("spawn")
    with ReplayMemory(LANES * LANE_CAP, frame_shape=SHAPE, stack=STACK, n_step=NSTEP, gamma=GAMMA,
                      lanes=LANES, impl=impl) as rb:
        stop, steps, results = ctx.Event(), ctx.Value("q", 0), ctx.Queue()
        w = ctx.Process(target=writer, args=(rb.name, impl, stop, steps))
        readers = [ctx.Process(target=reader, args=(rb.name, impl, detect, seconds, s, results, prioritized))
                   for s in range(2)]
        procs = [w, *readers]
        try:
            for p in procs:
                p.start()
            got = [results.get(timeout=seconds + 60) for _ in readers]
            stop.set()
            for p in procs:
                p.join(timeout=30)
                assert p.exitcode == 0, f"{p.name} exit code {p.exitcode}"
        finally:
            stop.set()
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        return got, steps.value


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", IMPLS)
def test_no_torn_samples(impl):
    got, steps = hammer(impl, detect=True)
    rows = sum(g[0] for g in got)
    assert steps > 10 * LANES * LANE_CAP, "the writer should lap the ring many times"
    assert rows > 0
    assert all(g[1] == 0 for g in got), got
    assert sum(g[3] for g in got) > 0, "no read was ever redrawn: the race was not exercised"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", IMPLS)
def test_torn_samples_without_detection(impl):
    """The negative control: without the seqlock re-check, the same readers see corrupt rows."""
    got, _ = hammer(impl, detect=False)
    assert sum(g[1] for g in got) > 0, got


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", IMPLS)
def test_no_torn_prioritized_samples(impl):
    """Two readers, each sampling by priority and writing priorities back, beside a writer lapping the
    ring: every row is consistent, and write-backs for slots overwritten meanwhile are dropped."""
    got, steps = hammer(impl, detect=True, prioritized=True)
    assert steps > 10 * LANES * LANE_CAP and sum(g[0] for g in got) > 0
    assert all(g[1] == 0 for g in got), got
    assert sum(g[5] for g in got) > 0, "no write-back ever met an overwritten slot: the race was not exercised"


def _attach_and_exit(name):
    rb = ReplayMemory.attach(name)
    rb.close()


@pytest.mark.timeout(120)
def test_readers_exiting_do_not_unlink():
    """Python 3.11's resource tracker unlinks segments its process attached when it exits; attached
    handles must not be tracked (spawned children share the parent's tracker; a subprocess has its
    own)."""
    with ReplayMemory(16, frame_shape=(2,), stack=1) as rb:
        p = mp.get_context("spawn").Process(target=_attach_and_exit, args=(rb.name,))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        code = ("import sys; from gorila_zmq.replay.memory import ReplayMemory; "
                "rb = ReplayMemory.attach(sys.argv[1]); rb.close()")
        r = subprocess.run([sys.executable, "-c", code, rb.name], capture_output=True, text=True,
                           timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, r.stderr
        assert "leaked" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        ReplayMemory.attach(rb.name).close()       # still there
