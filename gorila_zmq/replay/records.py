"""What one replay record holds, agreed by the agent (`Agent.record`), the replay memory, the global
replay's wire format and the learner's batches: the frame stored per step and the action.

A `Record` says the frame's shape and dtype, how many frames an observation stacks, and the action's
shape, dtype and bounds. From it come the memory's arguments, the packed wire record of global replay
(a fixed little-endian numpy structured dtype: nothing is pickled), and a sampled batch's layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

START, ADD = 0, 1          # wire record kinds: an episode's first frame, or a step
MAX_SAMPLE = 4096          # the largest batch a replay shard serves
# REPLAY_PRIORITY's records: a sampled row's slot and logical position (as its batch gave them) and |TD error|
PRIORITY = np.dtype([("index", "<i8"), ("position", "<i8"), ("td_abs", "<f4")])


@dataclass(frozen=True)
class Record:
    frame_shape: tuple        # what replay stores per step: (84, 84) for Atari, (4,) for CartPole
    stack: int                # frames per observation (1: the frame is the observation)
    frame_dtype: np.dtype
    action_shape: tuple       # () for a discrete action, (A,) for a continuous one
    action_dtype: np.dtype
    action_low: float         # every action component lies in [action_low, action_high]
    action_high: float
    stack_padding: str = "zeros"   # what precedes an episode's first frame in a stack: zeros, or "repeat" it
    full_windows: bool = False     # sample only whole n-step windows (or ones a termination cut short)

    @property
    def obs_shape(self) -> tuple:
        return (self.stack, *self.frame_shape) if self.stack > 1 else tuple(self.frame_shape)

    def memory_args(self) -> dict:
        """Keyword arguments of ReplayMemory for this record."""
        return dict(frame_shape=tuple(self.frame_shape), stack=self.stack, dtype=self.frame_dtype,
                    action_shape=tuple(self.action_shape), action_dtype=self.action_dtype,
                    stack_padding=self.stack_padding, full_windows=self.full_windows)

    def wire_dtype(self) -> np.dtype:
        """One packed transition record of global replay (REPLAY_ADD). `priority` (when `has_priority`
        is 1): on a step, the |TD error| its actor computed for the transition the step completes
        (agent.actor_priorities); with has_priority 0 (a zeroed record) the transition enters at the
        shard's current largest priority."""
        return np.dtype([("kind", "u1"), ("terminated", "u1"), ("truncated", "u1"), ("has_priority", "u1"),
                         ("lane", "<u4"), ("reward", "<f4"), ("priority", "<f4"),
                         ("action", np.dtype(self.action_dtype).newbyteorder("<"), tuple(self.action_shape)),
                         ("frame", np.dtype(self.frame_dtype).newbyteorder("<"), tuple(self.frame_shape))])

    def batch_layout(self, B: int, prioritized: bool = False) -> list[tuple[str, np.dtype, tuple]]:
        """(field, dtype, shape) of a sampled batch, in wire order (REPLAY_SAMPLE's reply); a prioritized
        batch also carries the importance weights and each row's slot and logical position."""
        out = [("obs", np.dtype(self.frame_dtype), (B, *self.obs_shape)),
               ("next_obs", np.dtype(self.frame_dtype), (B, *self.obs_shape)),
               ("action", np.dtype(self.action_dtype).newbyteorder("<"), (B, *self.action_shape)),
               ("reward", np.dtype("<f4"), (B,)), ("discount", np.dtype("<f4"), (B,))]
        if prioritized:
            out += [("weight", np.dtype("<f4"), (B,)), ("index", np.dtype("<i8"), (B,)),
                    ("position", np.dtype("<i8"), (B,))]
        return out

    def batch_nbytes(self, B: int, prioritized: bool = False) -> int:
        return sum(np.dtype(d).itemsize * math.prod(s) for _, d, s in self.batch_layout(B, prioritized))

    def bad_actions(self, actions: np.ndarray) -> str | None:
        """Why these actions cannot be stored (not finite, outside the bounds), or None."""
        a = np.asarray(actions)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return "an action is not finite"
        if a.size and ((a < self.action_low).any() or (a > self.action_high).any()):
            return f"an action lies outside [{self.action_low:g}, {self.action_high:g}]"
        return None


def discrete(env, n_actions: int) -> Record:
    """A discrete-action record for an environment spec (int64 actions in [0, n_actions))."""
    return Record(tuple(env.frame_shape), env.stack, np.dtype(env.dtype), (), np.dtype(np.int64), 0, n_actions - 1)


def continuous(env, action_dim: int, **options) -> Record:
    """A continuous-action record (float32 actions in [-1, 1]^action_dim); options: stack_padding,
    full_windows."""
    return Record(tuple(env.frame_shape), env.stack, np.dtype(env.dtype), (action_dim,), np.dtype(np.float32),
                  -1.0, 1.0, **options)
