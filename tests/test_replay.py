"""The replay memory against a naive reference on random episode streams, in both implementations.

The reference (`Ref`) keeps every episode as a Python list and derives each valid transition from
the definitions (stack of the last `stack` frames of the episode, zeros before its start; an n-step
window that stops at the episode's end; nothing that reaches the write head or an overwritten frame),
independently of the ring arithmetic of the kernel.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gorila_zmq.replay import memory as R
from gorila_zmq._native import pure_python
from gorila_zmq.replay.memory import ReplayMemory
from gorila_zmq.replay.segment import Layout

IMPLS = ["numpy"] if pure_python() else ["cython", "numpy"]


# ---------------------------------------------------------------- the reference


@dataclass
class Rec:
    frame: np.ndarray
    action: np.ndarray
    reward: float
    ep: int
    t: int
    term: bool = False
    trunc: bool = False


class Ref:
    def __init__(self, capacity, frame_shape, stack, dtype, n_step, gamma, lanes, action_shape=(),
                 action_dtype=np.int64, stack_padding="zeros", full_windows=False):
        self.repeat, self.full = stack_padding == "repeat", full_windows
        self.lcap = capacity // lanes
        self.frame_shape, self.stack, self.dtype = tuple(frame_shape), stack, dtype
        self.n, self.gamma = n_step, gamma
        self.action_shape, self.action_dtype = action_shape, action_dtype
        self.lanes = [[] for _ in range(lanes)]
        self.episodes = 0

    def open(self, lane):
        recs = self.lanes[lane]
        return bool(recs) and not (recs[-1].term or recs[-1].trunc)

    def start(self, frame, lane):
        if self.open(lane):
            self.lanes[lane][-1].trunc = True
        self.episodes += 1
        self.lanes[lane].append(Rec(np.array(frame, self.dtype), np.zeros(self.action_shape, self.action_dtype),
                                    0.0, self.episodes, 0))

    def add(self, action, reward, frame, term, trunc, lane):
        assert self.open(lane)
        last = self.lanes[lane][-1]
        self.lanes[lane].append(Rec(np.array(frame, self.dtype), np.array(action, self.action_dtype),
                                    float(np.float32(reward)), last.ep, last.t + 1, bool(term), bool(trunc)))

    def size(self):
        return sum(min(len(r), self.lcap) for r in self.lanes)

    def transitions(self):
        """{slot index: (obs, action, reward, discount, next_obs)} for every valid transition."""
        out = {}
        S = self.stack
        for lane, recs in enumerate(self.lanes):
            w = len(recs)
            lo = max(0, w - self.lcap + 1)          # the oldest slot is the writer's next target

            def stack_at(i):
                frames = []
                for j in range(S):
                    tt = recs[i].t - (S - 1 - j)
                    if tt < 0:                       # before the episode: zeros, or its first frame
                        frames.append(recs[i - recs[i].t].frame if self.repeat
                                      else np.zeros(self.frame_shape, self.dtype))
                        continue
                    src = i - (recs[i].t - tt)
                    if src < lo:
                        return None
                    frames.append(recs[src].frame)
                return np.stack(frames) if S > 1 else frames[0]

            for L in range(lo, w):
                steps, ok = [], True
                for i in range(1, self.n + 1):
                    if L + i >= w or recs[L + i].ep != recs[L].ep:
                        ok = False
                        break
                    steps.append(recs[L + i])
                    if recs[L + i].term or recs[L + i].trunc:
                        break
                if ok and self.full and len(steps) < self.n and not steps[-1].term:
                    ok = False                       # full_windows: none cut short by a truncation
                if not ok:
                    continue
                obs = stack_at(L)
                if obs is None:
                    continue
                k = len(steps)
                ret = sum(self.gamma ** i * s.reward for i, s in enumerate(steps))
                disc = 0.0 if steps[-1].term else self.gamma ** k
                out[lane * self.lcap + L % self.lcap] = (obs, steps[0].action, ret, disc, stack_at(L + k))
        return out


# ---------------------------------------------------------------- random streams


def _frame(rng, shape, dtype):
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(1, 250, shape).astype(dtype)


def run_stream(rng, rb, ref, steps, p_end=0.15, p_abandon=0.03, batched=False):
    """Random interleaving of lanes, episode ends (terminated, truncated, both), abandoned episodes;
    with batched=True consecutive steps go through add_batch."""
    lanes = rb.lanes
    pending = []

    def flush():
        if not pending:
            return
        a, r, f, te, tr, ln = map(np.array, zip(*pending))
        rb.add_batch(a, r, f, te, tr, lanes=ln)
        pending.clear()

    for _ in range(steps):
        lane = int(rng.integers(lanes))
        if not ref.open(lane) or rng.random() < p_abandon:
            flush()
            f = _frame(rng, rb.frame_shape, rb.dtype)
            rb.start_episode(f, lane=lane)
            ref.start(f, lane)
            continue
        end = rng.random() < p_end
        term = end and rng.random() < 0.5
        trunc = end and (not term or rng.random() < 0.2)
        if rb.action_shape:
            a = rng.standard_normal(rb.action_shape).astype(rb.action_dtype)
        else:
            a = int(rng.integers(0, 18))
        r = float(rng.integers(-3, 4)) + 0.25
        f = _frame(rng, rb.frame_shape, rb.dtype)
        if batched:
            pending.append((a, r, f, term, trunc, lane))
        else:
            rb.add(a, r, f, term, trunc, lane=lane)
        ref.add(a, r, f, term, trunc, lane)
    flush()


def check_against_ref(rb, ref, rng, batch=512):
    want = ref.transitions()
    assert len(rb) == ref.size()
    assert rb.num_valid() == len(want)
    assert sorted(rb.valid_indices().tolist()) == sorted(want)
    if not want:
        with pytest.raises(ValueError):
            rb.sample(4, rng)
        return
    batches = [rb.sample(batch, rng)]
    if rb.shares_frames:          # n_step 1 with a stack: the shared-frames layout, by the same rules
        shared = rb.sample(batch, rng, out=rb.allocate_batch(batch, pinned=False, shared_frames=True))
        assert shared.frames.shape == (batch, rb.stack + 1, *rb.frame_shape)
        assert np.shares_memory(shared.obs, shared.frames) and np.shares_memory(shared.next_obs, shared.frames)
        batches.append(shared)
    for b in batches:
        assert b.obs.shape == (batch, *rb.obs_shape) and b.obs.dtype == rb.dtype
        for i in range(batch):
            idx = int(b.index[i])
            assert idx in want, f"sampled invalid index {idx}"
            obs, action, ret, disc, nxt = want[idx]
            np.testing.assert_array_equal(b.obs[i], obs)
            np.testing.assert_array_equal(b.next_obs[i], nxt)
            np.testing.assert_array_equal(b.action[i], action)
            assert b.reward[i] == pytest.approx(ret, rel=1e-5, abs=1e-5)
            assert b.discount[i] == pytest.approx(disc, rel=1e-5, abs=1e-7)


CONFIGS = {
    "atari-like": dict(capacity=40, frame_shape=(6, 5), stack=4, dtype=np.uint8, n_step=1, gamma=0.99, lanes=1),
    "nstep-lanes": dict(capacity=90, frame_shape=(3, 4), stack=4, dtype=np.uint8, n_step=3, gamma=0.9, lanes=3),
    "vector": dict(capacity=30, frame_shape=(4,), stack=1, dtype=np.float32, n_step=1, gamma=0.99, lanes=1),
    "vector-nstep-lanes": dict(capacity=64, frame_shape=(4,), stack=1, dtype=np.float32, n_step=3, gamma=0.5, lanes=4),
    "continuous": dict(capacity=50, frame_shape=(2, 2), stack=2, dtype=np.uint8, n_step=5, gamma=0.8, lanes=2,
                       action_shape=(2,), action_dtype=np.float32),
    "minimal-lane": dict(capacity=8, frame_shape=(2,), stack=3, dtype=np.uint8, n_step=2, gamma=0.9, lanes=2),
    # DrQ-v2's replay: the first frame repeated before an episode, whole n-step windows only
    "drqv2-like": dict(capacity=80, frame_shape=(3, 2, 2), stack=3, dtype=np.uint8, n_step=3, gamma=0.99, lanes=2,
                       action_shape=(1,), action_dtype=np.float32, stack_padding="repeat", full_windows=True),
    "one-step-lanes-repeat": dict(capacity=60, frame_shape=(3, 2), stack=4, dtype=np.uint8, n_step=1, gamma=0.9,
                                  lanes=3, stack_padding="repeat"),
    "repeat-padding": dict(capacity=60, frame_shape=(2, 3), stack=4, dtype=np.uint8, n_step=2, gamma=0.9, lanes=1,
                           stack_padding="repeat"),
    "full-windows": dict(capacity=60, frame_shape=(2,), stack=2, dtype=np.uint8, n_step=4, gamma=0.9, lanes=2,
                         full_windows=True),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(impl, cfg, seed):
    kw = CONFIGS[cfg]
    rng = np.random.default_rng(seed)
    with ReplayMemory(**kw, impl=impl) as rb:
        ref = Ref(**kw)
        for chunk in range(4):            # check before, at and long after the first wrap-around
            run_stream(rng, rb, ref, steps=[10, 25, 60, 200][chunk], batched=bool(seed % 2))
            check_against_ref(rb, ref, rng)
        s = rb.stats()
        assert s["episodes"] == ref.episodes
        assert s["transitions_added"] == sum(len(r) for r in ref.lanes) - ref.episodes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lanes=st.integers(1, 3), stack=st.integers(1, 4), n_step=st.integers(1, 4),
       extra=st.integers(0, 20), steps=st.integers(0, 150), p_end=st.floats(0.0, 0.6),
       batched=st.booleans(), seed=st.integers(0, 2**32 - 1), impl=st.sampled_from(IMPLS),
       padding=st.sampled_from(["zeros", "repeat"]), full=st.booleans())
def test_matches_reference_hypothesis(lanes, stack, n_step, extra, steps, p_end, batched, seed, impl, padding, full):
    kw = dict(capacity=lanes * (n_step + 2 + extra), frame_shape=(3,), stack=stack, dtype=np.uint8,
              n_step=n_step, gamma=0.75, lanes=lanes, stack_padding=padding, full_windows=full)
    rng = np.random.default_rng(seed)
    with ReplayMemory(**kw, impl=impl) as rb:
        ref = Ref(**kw)
        run_stream(rng, rb, ref, steps, p_end=p_end, batched=batched)
        check_against_ref(rb, ref, rng, batch=64)


@pytest.mark.skipif(pure_python(), reason="needs the compiled kernel")
@pytest.mark.parametrize("cfg", ["nstep-lanes", "vector-nstep-lanes", "continuous", "drqv2-like"])
def test_cython_and_numpy_agree(cfg):
    """Same segment, same generator state: the two implementations return the same batch."""
    kw = CONFIGS[cfg]
    rng = np.random.default_rng(7)
    with ReplayMemory(**kw, impl="cython") as rb:
        run_stream(rng, rb, Ref(**kw), 300)
        other = ReplayMemory.attach(rb.name, impl="numpy")
        try:
            a = rb.sample(200, np.random.default_rng(3))
            b = other.sample(200, np.random.default_rng(3))
            for k, v in a.arrays().items():
                np.testing.assert_allclose(v, b.arrays()[k], rtol=1e-6, err_msg=k)
            np.testing.assert_array_equal(rb.valid_indices(), other.valid_indices())
            # and the NumPy writer produces what the Cython reader expects
            run_stream(rng, other, Ref(**kw), 50)
            np.testing.assert_array_equal(rb.valid_indices(), other.valid_indices())
        finally:
            other.close()


def test_default_implementation_follows_env():
    assert R.IMPLEMENTATION == ("numpy" if pure_python() else "cython")
    with ReplayMemory(10, frame_shape=(2,), stack=1) as rb:
        assert rb.implementation == R.IMPLEMENTATION


# ---------------------------------------------------------------- semantics, spelled out


def _f(v, shape=(2, 2)):
    return np.full(shape, v, np.uint8)


@pytest.mark.parametrize("impl", IMPLS)
def test_episode_start_is_zero_filled_not_mixed(impl):
    with ReplayMemory(100, frame_shape=(2, 2), stack=4, impl=impl) as rb:
        rb.start_episode(_f(1))
        for t in range(2, 6):
            rb.add(0, 0.0, _f(t), t == 5, False)
        rb.start_episode(_f(10))
        rb.add(1, 1.0, _f(11), False, False)
        rb.add(2, 1.0, _f(12), False, False)
        b = rb.sample(64, np.random.default_rng(0))
        rows = np.flatnonzero(b.obs[:, -1, 0, 0] == 10)
        assert rows.size
        for r in rows:   # first transition of episode 2: three zero frames, never episode 1's
            np.testing.assert_array_equal(b.obs[r, :, 0, 0], [0, 0, 0, 10])
            np.testing.assert_array_equal(b.next_obs[r, :, 0, 0], [0, 0, 10, 11])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("terminated", [True, False])
def test_nstep_stops_at_episode_end(impl, terminated):
    g = 0.5
    with ReplayMemory(100, frame_shape=(1,), stack=2, n_step=3, gamma=g, impl=impl) as rb:
        rb.start_episode(np.array([1], np.uint8))
        rb.add(7, 1.0, np.array([2], np.uint8), False, False)
        rb.add(8, 2.0, np.array([3], np.uint8), terminated, not terminated)
        rb.start_episode(np.array([9], np.uint8))
        rb.add(9, 100.0, np.array([10], np.uint8), False, False)
        got = {}
        b = rb.sample(200, np.random.default_rng(1))
        for i in range(200):
            got[int(b.obs[i, -1, 0])] = (b.action[i], b.reward[i], b.discount[i], b.next_obs[i, :, 0].tolist())
        # episode 2 has only one step, short of its 3-step window: not sampleable yet
        assert set(got) == {1, 2}
        assert got[1][0] == 7 and got[1][1] == pytest.approx(1.0 + g * 2.0)
        assert got[2][0] == 8 and got[2][1] == pytest.approx(2.0)
        # a truncation bootstraps from the real final frame (3) with g^k; a termination does not
        assert got[1][2] == pytest.approx(0.0 if terminated else g ** 2)
        assert got[2][2] == pytest.approx(0.0 if terminated else g)
        assert got[1][3] == [2, 3] and got[2][3] == [2, 3]


@pytest.mark.parametrize("impl", IMPLS)
def test_abandoned_episode_is_ended_as_truncated(impl):
    with ReplayMemory(100, frame_shape=(1,), stack=1, n_step=3, gamma=0.5, impl=impl) as rb:
        rb.start_episode(np.array([1], np.uint8))
        rb.add(0, 1.0, np.array([2], np.uint8), False, False)
        assert rb.num_valid() == 0            # a 3-step window is not written yet
        rb.start_episode(np.array([5], np.uint8))   # e.g. a restarted actor
        b = rb.sample(8, np.random.default_rng(0))
        assert (b.obs[:, 0] == 1).all() and (b.next_obs[:, 0] == 2).all()
        assert np.allclose(b.discount, 0.5) and np.allclose(b.reward, 1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_sampling_is_uniform_over_valid(impl):
    """Lanes of different fill and episode boundaries: every valid transition equally likely."""
    rng = np.random.default_rng(5)
    kw = dict(capacity=90, frame_shape=(2,), stack=2, dtype=np.uint8, n_step=2, gamma=0.9, lanes=3)
    with ReplayMemory(**kw, impl=impl) as rb:
        ref = Ref(**kw)
        for lane, steps in ((0, 100), (1, 12), (2, 3)):
            rb.start_episode(_f(1, (2,)), lane)
            ref.start(_f(1, (2,)), lane)
            for t in range(steps):
                end = t % 9 == 8
                rb.add(0, 0.0, _f(t, (2,)), end, False, lane)
                ref.add(0, 0.0, _f(t, (2,)), end, False, lane)
                if end:
                    rb.start_episode(_f(1, (2,)), lane)
                    ref.start(_f(1, (2,)), lane)
        valid = sorted(ref.transitions())
        assert sorted(rb.valid_indices().tolist()) == valid
        n = 40_000
        out = rb.allocate_batch(1000, pinned=False)
        counts = {i: 0 for i in valid}
        for _ in range(n // 1000):
            for i in rb.sample(1000, rng, out=out).index:
                counts[int(i)] += 1
        d = len(valid)
        expect = n / d
        chi2 = sum((c - expect) ** 2 / expect for c in counts.values())
        assert chi2 < d + 6 * np.sqrt(2 * d), (chi2, d)


class _RacingCore:
    """Runs race() between a reader's snapshot and its gather: what a concurrent writer can do."""

    def __init__(self, core, race):
        self._core, self._race = core, race

    def __getattr__(self, name):
        return getattr(self._core, name)

    def gather(self, *args):
        self._race()
        return self._core.gather(*args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("detect", [True, False])
def test_rows_overwritten_during_a_gather_are_redrawn(impl, detect):
    """Deterministic seqlock check: between the reader's snapshot and its gather the writer publishes
    3 slots (over the oldest ones the snapshot still counts as retained) and is half-way through a
    4th (scribbled 255s, not yet published). Every returned row must be consistent; without the
    re-check (detect=False) some are not. Frames hold their step number."""
    cap = 16
    with ReplayMemory(cap, frame_shape=(3,), stack=4, impl=impl) as rb:
        t = [0]

        def step():
            t[0] += 1
            rb.add(0, 0.0, np.full(3, t[0] % 200 + 1, np.uint8), False, False)

        rb.start_episode(np.full(3, 1, np.uint8))
        for _ in range(40):
            step()
        off = rb._lay.offsets()["frames"]
        views = {"frames": rb._seg[off:off + cap * 3].reshape(cap, 3)}

        def race():
            for _ in range(3):
                step()
            views["frames"][(t[0] + 1) % cap] = 255      # the next slot, mid-write

        reader = ReplayMemory.attach(rb.name, impl=impl)
        try:
            reader._core = _RacingCore(reader._core, race)
            reader._detect_torn = detect
            rng, bad = np.random.default_rng(0), 0
            for _ in range(60):
                b = reader.sample(8, rng)
                o, n = b.obs[:, :, 0].astype(int), b.next_obs[:, :, 0].astype(int)
                ok = ((np.diff(o, axis=1) % 200 == 1).all(1) & (o != 255).all(1)
                      & (n[:, :-1] == o[:, 1:]).all(1) & (n[:, -1] == o[:, -1] % 200 + 1))
                bad += int((~ok).sum())
            if detect:
                assert bad == 0 and reader.stats()["torn_redraws"] > 0
            else:
                assert bad > 0
        finally:
            views.clear()
            reader.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_writer_errors(impl):
    with ReplayMemory(20, frame_shape=(2,), stack=1, lanes=2, impl=impl) as rb:
        with pytest.raises(RuntimeError, match="start_episode"):
            rb.add(0, 0.0, _f(1, (2,)), False, False)
        with pytest.raises(ValueError, match="shape"):
            rb.start_episode(_f(1, (3,)))
        with pytest.raises(IndexError):
            rb.start_episode(_f(1, (2,)), lane=2)
        rb.start_episode(_f(1, (2,)), lane=0)
        with pytest.raises(RuntimeError, match="entry 1"):
            rb.add_batch([0, 0], [1.0, 1.0], np.ones((2, 2), np.uint8), [False, False], [False, False])
        assert rb.stats()["transitions_added"] == 1          # entry 0 went in
        with pytest.raises(ValueError, match="action shape"):
            rb.add([0, 1], 0.0, _f(1, (2,)), False, False)


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_needs_a_valid_transition(impl):
    with ReplayMemory(20, frame_shape=(2,), stack=1, n_step=2, impl=impl) as rb:
        with pytest.raises(ValueError, match="no transition"):
            rb.sample(4)
        rb.start_episode(_f(1, (2,)))
        rb.add(0, 0.0, _f(2, (2,)), False, False)
        with pytest.raises(ValueError, match="no valid"):
            rb.sample(4)
        rb.add(0, 0.0, _f(3, (2,)), False, False)
        assert len(rb.sample(4)) == 4


def test_batch_allocation_and_validation():
    with ReplayMemory(20, frame_shape=(3, 3), stack=2) as rb:
        b = rb.allocate_batch(5, pinned=False)
        assert b.obs.shape == (5, 2, 3, 3) and b.action.dtype == np.int64
        assert b.reward.dtype == b.discount.dtype == np.float32 and b.index.dtype == np.int64
        import torch
        if not torch.cuda.is_available():
            assert isinstance(rb.allocate_batch(2).obs, np.ndarray)   # pinned=None: plain NumPy
        t = b.as_tensors()
        b.obs[...] = 3
        assert int(t.obs.sum()) == 3 * b.obs.size and t.obs.dtype == torch.uint8   # shared memory
        rb.start_episode(np.ones((3, 3), np.uint8))
        rb.add(0, 0.0, np.ones((3, 3), np.uint8), False, False)
        assert rb.sample(5, out=b) is b
        with pytest.raises(ValueError, match="out.obs"):
            rb.sample(4, out=b)                 # wrong batch size
        bad = rb.allocate_batch(5, pinned=False)
        bad.reward = np.zeros(5, np.float64)
        with pytest.raises(ValueError, match="out.reward"):
            rb.sample(5, out=bad)
    with ReplayMemory(20, frame_shape=(4,), stack=1, dtype=np.float32) as rb:
        assert rb.obs_shape == (4,) and rb.allocate_batch(3).obs.shape == (3, 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_frames_batch_layout(impl):
    """Rows of stack + 1 frames (n_step 1): obs and next_obs are views, 5 frames written per Atari row
    instead of 8, and the tensors too are views of one `frames` tensor. Refused where next_obs is
    not obs shifted by one frame, and for arrays that are not its views."""
    import torch
    with ReplayMemory(50, frame_shape=(3, 3), stack=4, impl=impl) as rb:
        assert rb.shares_frames
        b = rb.allocate_batch(6, pinned=False, shared_frames=True)
        assert b.frames.shape == (6, 5, 3, 3) and b.obs.shape == b.next_obs.shape == (6, 4, 3, 3)
        assert b.frames.nbytes == 6 * 5 * 9                       # pairs: 6 * 8 * 9
        rb.start_episode(np.full((3, 3), 1, np.uint8))
        for v in range(2, 9):
            rb.add(0, float(v), np.full((3, 3), v, np.uint8), False, False)
        rb.sample(6, np.random.default_rng(0), out=b)
        for i in range(6):                                         # frames v-3..v+1, zeros before frame 1
            v = int(b.next_obs[i, -1, 0, 0])
            assert b.reward[i] == v and [int(f[0, 0]) for f in b.frames[i]] == [max(x, 0) for x in range(v - 4, v + 1)]
        t = b.as_tensors()
        assert t.frames.data_ptr() == t.obs.data_ptr() == t.next_obs.data_ptr() - 9
        assert torch.equal(t.next_obs, torch.from_numpy(np.ascontiguousarray(b.next_obs)))
        b.obs = b.obs.copy()                                       # no longer the view the kernel fills
        with pytest.raises(ValueError, match="shared_views"):
            rb.sample(6, out=b)
    with ReplayMemory(50, frame_shape=(3, 3), stack=4, n_step=3, impl=impl) as rb:
        assert not rb.shares_frames
        with pytest.raises(ValueError, match="n_step 1"):
            rb.allocate_batch(4, pinned=False, shared_frames=True)
        rb.start_episode(np.ones((3, 3), np.uint8))
        for _ in range(5):
            rb.add(0, 0.0, np.ones((3, 3), np.uint8), False, False)
        with ReplayMemory(50, frame_shape=(3, 3), stack=4, impl=impl) as one_step:
            foreign = one_step.allocate_batch(4, pinned=False, shared_frames=True)
        with pytest.raises(ValueError, match="n_step 1"):
            rb.sample(4, out=foreign)
    with ReplayMemory(50, frame_shape=(4,), stack=1, dtype=np.float32, impl=impl) as rb:
        assert not rb.shares_frames                               # nothing to share without a stack


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_pinned_batch():
    with ReplayMemory(20, frame_shape=(3, 3), stack=2) as rb:
        b = rb.allocate_batch(4)
        t = b.as_tensors()
        assert t.obs.is_pinned() and t.obs.data_ptr() == b.obs.ctypes.data


# ---------------------------------------------------------------- shared memory, attach, accounting


def test_attach_validates():
    with pytest.raises(FileNotFoundError):
        ReplayMemory.attach("gzrb_does_not_exist_x")
    other = shared_memory.SharedMemory(create=True, size=4096)
    try:
        other.buf[:16] = b"something else!!"
        with pytest.raises(ValueError, match="not a gorila-zmq replay memory"):
            ReplayMemory.attach(other.name)
    finally:
        other.close()
        other.unlink()
    tiny = shared_memory.SharedMemory(create=True, size=16)
    try:
        with pytest.raises(ValueError, match="too small"):
            ReplayMemory.attach(tiny.name)
    finally:
        tiny.close()
        tiny.unlink()
    with ReplayMemory(20, frame_shape=(3, 3), stack=2, n_step=2) as rb:
        with ReplayMemory.attach(rb.name, frame_shape=(3, 3), stack=2, dtype=np.uint8, n_step=2) as ro:
            assert (ro.capacity, ro.frame_shape, ro.stack, ro.n_step, ro.dtype) == (20, (3, 3), 2, 2, np.uint8)
            assert not ro.owner and rb.owner
        with pytest.raises(ValueError, match="stack=2, expected 4"):
            ReplayMemory.attach(rb.name, stack=4)
        with pytest.raises(ValueError, match="dtype"):
            ReplayMemory.attach(rb.name, dtype=np.float32)
        assert (rb.stack_padding, rb.full_windows) == ("zeros", False)
        for offset, junk, msg in ((8, b"\x63\0\0\0", "version"), (64, b"zz\0", "corrupt header"),
                                  (32, b"\0" * 8, "corrupt header"), (48, b"\x08", "unknown option bits")):
            saved = bytes(rb._shm.buf[offset:offset + len(junk)])
            rb._shm.buf[offset:offset + len(junk)] = junk
            try:
                with pytest.raises(ValueError, match=msg):
                    ReplayMemory.attach(rb.name)
            finally:
                rb._shm.buf[offset:offset + len(junk)] = saved
        ReplayMemory.attach(rb.name).close()       # restored: attaches again
    # the header carries the padding and window options to every reader
    with ReplayMemory(20, frame_shape=(2,), stack=2, n_step=2, stack_padding="repeat", full_windows=True) as rb:
        with ReplayMemory.attach(rb.name, stack_padding="repeat", full_windows=True) as ro:
            assert (ro.stack_padding, ro.full_windows) == ("repeat", True)
        with pytest.raises(ValueError, match="stack_padding='repeat', expected 'zeros'"):
            ReplayMemory.attach(rb.name, stack_padding="zeros")
        with pytest.raises(ValueError, match="full_windows=True, expected False"):
            ReplayMemory.attach(rb.name, full_windows=False)


def test_constructor_validates():
    with pytest.raises(ValueError, match="n_step \\+ 2"):
        ReplayMemory(6, frame_shape=(2,), n_step=3, lanes=2)
    with pytest.raises(ValueError, match="gamma"):
        ReplayMemory(10, frame_shape=(2,), gamma=1.5)
    with pytest.raises(ValueError, match="dtype"):
        ReplayMemory(10, frame_shape=(2,), dtype=object)
    with pytest.raises(ValueError, match="capacity >= lanes"):
        ReplayMemory(2, frame_shape=(2,), lanes=3)
    with pytest.raises(ValueError, match="stack_padding must be one of zeros, repeat"):
        ReplayMemory(10, frame_shape=(2,), stack_padding="edge")


def test_capacity_and_byte_accounting():
    with ReplayMemory(10, frame_shape=(2,), stack=1, lanes=3) as rb:
        assert (rb.capacity, rb.lane_capacity, rb.lanes) == (9, 3, 3)   # capacity // lanes each
    with ReplayMemory(1000, frame_shape=(84, 84), stack=4) as rb:
        assert rb.bytes_per_slot == 84 * 84 + 8 + 4 + 1 == 7069
        assert 1000 * 7069 <= rb.nbytes <= 1000 * 7069 + 3 * 4096
        assert rb._shm.size >= rb.nbytes
        path = f"/dev/shm/{rb.name}"
        if os.path.exists(path):     # nothing is resident until written (sparse tmpfs file)
            assert os.stat(path).st_blocks * 512 <= 2 * 4096
    lay = Layout(1, 1_000_000, 4, 1, 0.99, (84, 84), np.dtype(np.uint8), (), np.dtype(np.int64))
    assert lay.offsets()["total"] < 7.1e9                     # 1 M Atari transitions in ~7.07 GB


@pytest.mark.parametrize("impl", IMPLS)
def test_lifetime(impl):
    rb = ReplayMemory(10, frame_shape=(2,), stack=1, impl=impl)
    name = rb.name
    clone = pickle.loads(pickle.dumps(rb))           # pickling attaches (for spawned processes)
    assert clone.name == name and not clone.owner
    rb.start_episode(_f(1, (2,)))
    assert clone.stats()["frames_written"] == 1
    clone.close()
    clone.close()                                    # idempotent
    with pytest.raises(ValueError, match="closed"):
        clone.sample(1)
    with rb:
        pass
    with pytest.raises(FileNotFoundError):           # the owner's `with` unlinked it
        ReplayMemory.attach(name)
