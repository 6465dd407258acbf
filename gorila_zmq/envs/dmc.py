"""DeepMind Control Suite tasks from pixels (DrQ-v2's setting), as a gymnasium.Env.

`DMCEnv("cartpole_swingup")`: 84x84 RGB renders (camera 0; 2 for quadruped), a stack of the last 3
frames as a (9, 84, 84) uint8 observation, action repeat 2 (rewards summed), actions in [-1, 1]. The
suite's time limit ends an episode as a truncation (discount stays 1), never a termination.
`fast_render=True` turns shadows and multisampling off (about 4x faster rendering on a CPU).

Rendering is headless: MUJOCO_GL, when unset, becomes egl if an EGL context can be made here, else
osmesa (Debian's libosmesa6) with a warning; a MUJOCO_GL you set is used as is. Needs the `dmc` extra: `pip install 'gorila-zmq[dmc]'` (dm_control with
mujoco==3.17.0: 4.0.0 breaks dm_control).
"""
from __future__ import annotations

import logging
import os

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from gorila_zmq.fields import ConfigError, UserError

log = logging.getLogger("gorila_zmq.envs.dmc")


class MissingExtra(UserError, ImportError):
    """dm_control (the dmc extra) is not installed."""


class UnknownTaskError(ConfigError):
    pass


def pick_gl_backend() -> str:
    """MUJOCO_GL for headless rendering: the user's choice if set; else egl when an EGL context can be
    made here, else osmesa (software; Debian's libosmesa6), with a warning saying why."""
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    try:
        from mujoco.egl import GLContext
        ctx = GLContext(1, 1)
        ctx.free()
        return "egl"
    except Exception as e:  # noqa: BLE001 - any EGL failure means: use the fallback
        log.warning("EGL rendering unavailable (%s: %s); falling back to MUJOCO_GL=osmesa "
                    "(needs libosmesa6)", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return "osmesa"


def _suite():
    if not os.environ.get("MUJOCO_GL"):
        try:
            os.environ["MUJOCO_GL"] = pick_gl_backend()
        except ImportError:
            pass                                 # no mujoco: the import below says how to install it
    try:
        from dm_control import suite
    except ImportError as e:
        raise MissingExtra("DeepMind Control tasks need the dmc extra: pip install 'gorila-zmq[dmc]' "
                          f"(dm_control, mujoco==3.17.0); import failed: {e}") from None
    return suite


def available_tasks() -> list[str]:
    return sorted(f"{d}_{t}" for d, t in _suite().ALL_TASKS)


def resolve_task(name: str) -> tuple[str, str]:
    """'cartpole_swingup' -> ('cartpole', 'swingup'); 'ball_in_cup_catch' -> ('ball_in_cup', 'catch')."""
    key = name.lower().replace("-", "_")
    for d, t in _suite().ALL_TASKS:
        if f"{d}_{t}" == key:
            return d, t
    raise UnknownTaskError(f"unknown DeepMind Control task {name!r}; available: {', '.join(available_tasks())}")


class DMCEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, name: str = "cartpole_swingup", *, frame_stack: int = 3, action_repeat: int = 2,
                 size: int = 84, camera_id: int | None = None, fast_render: bool = False,
                 time_limit: float | None = None, seed: int | None = None):
        suite = _suite()
        self.domain, self.task = resolve_task(name)
        task_kwargs = {"random": seed}
        if time_limit is not None:
            task_kwargs["time_limit"] = time_limit
        self._env = suite.load(self.domain, self.task, task_kwargs=task_kwargs)
        self._repeat, self._k, self._size = action_repeat, frame_stack, size
        self._camera = camera_id if camera_id is not None else (2 if self.domain == "quadruped" else 0)
        if fast_render:
            vis = self._env.physics.model.vis
            vis.quality.shadowsize = 0
            vis.quality.offsamples = 0
            self._env.physics.model.light_castshadow[:] = 0
        spec = self._env.action_spec()
        self._low, self._high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, spec.shape, dtype=np.float32)
        self.observation_space = spaces.Box(0, 255, (3 * frame_stack, size, size), dtype=np.uint8)
        self._frames = np.zeros((frame_stack, 3, size, size), np.uint8)

    def _render(self) -> np.ndarray:
        img = self._env.physics.render(self._size, self._size, camera_id=self._camera)
        return np.ascontiguousarray(img.transpose(2, 0, 1))

    def _obs(self) -> np.ndarray:
        return self._frames.reshape(-1, self._size, self._size).copy()

    @property
    def last_frame(self) -> np.ndarray:
        """The newest (3, size, size) RGB frame: what a frame-deduplicated replay stores."""
        return self._frames[-1]

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.task.random.seed(seed)
        self._env.reset()
        self._frames[:] = self._render()          # the first frame repeated, as the paper's frame stack
        return self._obs(), {}

    def step(self, action):
        a = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        a = self._low + (a + 1.0) * 0.5 * (self._high - self._low)
        reward, truncated = 0.0, False
        for _ in range(self._repeat):
            ts = self._env.step(a)
            reward += ts.reward or 0.0
            if ts.last():
                truncated = ts.discount > 0           # the suite's time limit
                terminated = not truncated
                break
        else:
            terminated = False
        self._frames[:-1] = self._frames[1:]
        self._frames[-1] = self._render()
        return self._obs(), float(reward), bool(terminated), bool(truncated), {"raw_reward": float(reward)}

    def close(self) -> None:
        self._env.close()
