"""The replay memory's kernel in NumPy: ext/replay.pyx's Core over the same segment layout, with the same
results (GORILA_PUREPYTHON=1 selects it; the test suite runs against both)."""
from __future__ import annotations

import numpy as np

# Slot flags (the same values in ext/replay.pyx).
START, TERMINATED, TRUNCATED = 1, 2, 4
ENDED = TERMINATED | TRUNCATED


class NumpyCore:
    """ext/replay.pyx's Core in NumPy: the same segment layout, the same results."""

    def __init__(self, seg, off_writes, off_episodes, off_frames, off_actions, off_rewards, off_flags,
                 lanes, cap, stack, nstep, fb, ab, gamma, pad_repeat=False, full_windows=False):
        n = lanes * cap
        self.writes = seg[off_writes:off_writes + 8 * lanes].view(np.int64)
        self.episodes = seg[off_episodes:off_episodes + 8 * lanes].view(np.int64)
        self.frames = seg[off_frames:off_frames + n * fb].reshape(lanes, cap, fb)
        self.actions = seg[off_actions:off_actions + n * ab].reshape(lanes, cap, ab)
        self.rewards = seg[off_rewards:off_rewards + 4 * n].view(np.float32).reshape(lanes, cap)
        self.flags = seg[off_flags:off_flags + n].reshape(lanes, cap)
        self.lanes, self.cap, self.stack, self.nstep = lanes, cap, stack, nstep
        self.fb, self.ab, self.gamma = fb, ab, gamma
        self.pad_repeat, self.full_windows = bool(pad_repeat), bool(full_windows)

    def release(self):
        self.writes = self.episodes = self.frames = self.actions = self.rewards = self.flags = None

    # writer
    def write(self, lane, frame, action, reward, flags):
        cap, lf = self.cap, self.flags[lane]
        w = int(self.writes[lane])
        last = (w - 1) % cap
        open_ = w > 0 and not (lf[last] & ENDED)
        slot = w % cap
        if flags & START:
            if open_:
                lf[last] |= TRUNCATED
            self.actions[lane, slot] = 0
            self.rewards[lane, slot] = 0
            self.episodes[lane] += 1
        else:
            if not open_:
                return False
            self.actions[lane, slot] = np.ravel(action).view(np.uint8)
            self.rewards[lane, slot] = reward
        self.frames[lane, slot] = np.ravel(frame).view(np.uint8)
        lf[slot] = flags
        self.writes[lane] = w + 1        # publish after the data (numpy calls are not reordered)
        return True

    def write_many(self, lanes, frames, actions, rewards, flags):
        for i in range(lanes.shape[0]):
            if not self.write(int(lanes[i]), frames[i], actions[i], rewards[i], int(flags[i])):
                return i
        return -1

    # readers
    def snapshot(self, w, lo, cum):
        np.copyto(w, self.writes)
        np.maximum(w - self.cap + 1, 0, out=lo)
        cnt = w - lo
        cum[0] = 0
        np.cumsum(cnt[:-1], out=cum[1:])
        return int(cnt.sum())

    def _valid(self, lane, L, w, lo):
        cap, lf = self.cap, self.flags
        ok = (L >= lo) & (L + 1 <= w - 1)
        k = np.full(L.shape, self.nstep, np.int64)
        term = np.zeros(L.shape, bool)
        ended = np.zeros(L.shape, bool)
        for i in range(1, self.nstep + 1):
            x = L + i
            ok &= ~(~ended & (x > w - 1))
            f = lf[lane, x % cap]
            live = ok & ~ended
            ok &= ~(live & ((f & START) != 0))
            e = ok & live & ((f & ENDED) != 0)
            if self.full_windows and i < self.nstep:      # cut short by a truncation: not drawn
                ok &= ~(e & ((f & TERMINATED) == 0))
                e &= ok
            k[e] = i
            term |= e & ((f & TERMINATED) != 0)
            ended |= e
        low = L.copy()
        stop = np.zeros(L.shape, bool)
        for _ in range(self.stack - 1):
            stop |= ~ok | ((lf[lane, low % cap] & START) != 0)
            low -= ~stop
            ok &= ~(~stop & (low < lo))
        return ok, k, term, low

    def gather(self, x, total, w, lo, cum, rows, filled, obs, next_obs, action, reward, discount,
               index, row_lane, row_low):
        """next_obs None: `obs` is a shared-frames buffer (rows of stack + 1 frames, n_step 1)."""
        if next_obs is None and self.nstep != 1:
            raise ValueError("a shared-frames batch needs n_step == 1")
        want = rows.shape[0] - filled
        if want <= 0 or x.shape[0] == 0:
            return filled
        u = np.minimum((x * total).astype(np.int64), total - 1)
        lane = np.searchsorted(cum, u, side="right") - 1
        L = lo[lane] + (u - cum[lane])
        ok, k, term, low = self._valid(lane, L, w[lane], lo[lane])
        sel = np.flatnonzero(ok)[:want]
        if sel.size == 0:
            return filled
        lane, L, k, term, low = lane[sel], L[sel], k[sel], term[sel], low[sel]
        r = rows[filled:filled + sel.size]
        B, S, cap = reward.shape[0], self.stack, self.cap
        back = (S - 1 - np.arange(S))[None, :]
        shared = next_obs is None
        for out, top in ((obs, L),) if shared else ((obs, L), (next_obs, L + k)):
            x = top[:, None] - back
            if self.pad_repeat:                           # before the episode's first frame: that frame
                x = np.maximum(x, low[:, None])
            g = self.frames[lane[:, None], x % cap]
            if not self.pad_repeat:
                g[x < low[:, None]] = 0                   # ... or zeros
            rows_out = out.reshape(B, -1).view(np.uint8).reshape(B, S + shared, self.fb)
            rows_out[r, :S] = g
            if shared:                                    # next_obs = frames 1..S: only the newest is new
                rows_out[r, S] = self.frames[lane, (L + 1) % cap]
        action.reshape(B, -1).view(np.uint8)[r] = self.actions[lane, (L + 1) % cap]
        ret = np.zeros(sel.size)
        g = np.ones(sel.size)
        for i in range(1, self.nstep + 1):
            act = i <= k
            ret = np.where(act, ret + g * self.rewards[lane, (L + i) % cap].astype(np.float64), ret)
            g = np.where(act, g * self.gamma, g)
        reward[r] = ret
        discount[r] = np.where(term, 0.0, g)
        index[r] = lane * cap + L % cap
        row_lane[r] = lane
        row_low[r] = low
        return filled + sel.size

    def torn(self, rows, n, row_lane, row_low, out):
        rr = rows[:n]
        bad = rr[row_low[rr] <= self.writes.copy()[row_lane[rr]] - self.cap]
        out[:bad.size] = bad
        return bad.size

    def valid_u(self, w, lo, cum, out=None):
        n = 0
        for l in range(self.lanes):
            for a in range(int(lo[l]), int(w[l]), 1 << 16):
                L = np.arange(a, min(a + (1 << 16), int(w[l])), dtype=np.int64)
                lane = np.full(L.shape, l, np.int64)
                ok = self._valid(lane, L, w[lane], lo[lane])[0]
                u = cum[l] + (L[ok] - lo[l])
                if out is not None:
                    out[n:n + u.size] = u
                n += u.size
        return n
