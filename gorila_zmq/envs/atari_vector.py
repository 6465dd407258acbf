"""A gymnasium VectorEnv of AtariEnv instances, for training loops of your own that want our fused
preprocessing (the actor role steps its environments with envs.VecEnv instead)."""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from gorila_zmq.envs.atari import make_atari


class AtariVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` AtariEnvs stepped one after another in this process, for batched inference.

    step(actions) returns obs (E, 4, 84, 84) uint8, rewards (E,) float32, terminated and truncated
    (E,) bool, and info. Finished envs reset in the same step (gymnasium's SAME_STEP autoreset):
    for such an env, obs[i] is already the first observation of its next episode (after a
    life-loss terminal: of the continued game), and the observation it finished on is in
    ``info["final_obs"][i]``, flagged by ``info["_final_obs"][i]`` (both present only on steps
    where some env finished; unflagged rows are zeros). The newest frame of every env is
    ``obs[:, -1]`` (``last_frames``), so an actor writing frames to replay stores
    ``info["final_obs"][i, -1]`` as the last frame of the finished episode and ``obs[i, -1]`` as
    the first of the next one.

    info arrays (E,): lives, episode_frame_number, raw_reward, life_lost, game_over — all from the
    step itself, before any reset; when some game ended: episode = {"r", "l", "frames"} arrays
    with the mask ``_episode``. ``copy=False`` returns the internal obs buffer (overwritten by the
    next step) instead of a copy. ``seed`` (here or in reset) seeds env i with seed + i; other
    keyword arguments go to make_atari / AtariEnv.
    """

    def __init__(self, game: str, num_envs: int, *, copy: bool = True, evaluation: bool = False,
                 seed: int | None = None, **env_kwargs):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.envs = [make_atari(game, evaluation=evaluation,
                                seed=None if seed is None else seed + i, **env_kwargs)
                     for i in range(num_envs)]
        env = self.envs[0]
        self.num_envs = num_envs
        self.copy = copy
        self.single_observation_space = env.observation_space
        self.single_action_space = env.action_space
        self.observation_space = gym.vector.utils.batch_space(env.observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(env.action_space, num_envs)
        self.metadata = {"render_modes": [], "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        self.render_mode = None
        self._obs = np.zeros((num_envs, *env.observation_space.shape), dtype=np.uint8)
        self._rewards = np.zeros(num_envs, dtype=np.float32)
        self._terminated = np.zeros(num_envs, dtype=bool)
        self._truncated = np.zeros(num_envs, dtype=bool)

    @property
    def last_frames(self) -> np.ndarray:
        """(E, 84, 84) view of every env's newest frame (valid until the next step)."""
        return self._obs[:, -1]

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        if seed is None or isinstance(seed, (int, np.integer)):
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"{len(seeds)} seeds for {self.num_envs} envs")
        E = self.num_envs
        info = {"lives": np.zeros(E, np.int32), "episode_frame_number": np.zeros(E, np.int64),
                "noops": np.zeros(E, np.int32)}
        for i, (env, s) in enumerate(zip(self.envs, seeds)):
            _, inf = env.reset(seed=s, options=options)
            self._obs[i] = env._frames.stack
            for key in info:
                info[key][i] = inf[key]
        return (self._obs.copy() if self.copy else self._obs), info

    def step(self, actions):
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        if actions.min() < 0 or actions.max() >= self.single_action_space.n:
            raise ValueError(f"actions {actions} outside 0..{self.single_action_space.n - 1}")
        E = self.num_envs
        lives = np.zeros(E, np.int32)
        frame_no = np.zeros(E, np.int64)
        raw = np.zeros(E, np.float32)
        life_lost = np.zeros(E, bool)
        game_over = np.zeros(E, bool)
        info: dict[str, Any] = {}
        for i, env in enumerate(self.envs):
            r, term, trunc, inf = env._step(int(actions[i]))
            self._rewards[i], self._terminated[i], self._truncated[i] = r, term, trunc
            lives[i], frame_no[i], raw[i] = inf["lives"], inf["episode_frame_number"], inf["raw_reward"]
            life_lost[i], game_over[i] = inf["life_lost"], inf["game_over"]
            if term or trunc:
                if "final_obs" not in info:
                    info["final_obs"] = np.zeros_like(self._obs)
                    info["_final_obs"] = np.zeros(E, bool)
                info["final_obs"][i] = env._frames.stack
                info["_final_obs"][i] = True
                if inf["game_over"]:
                    if "episode" not in info:
                        info["episode"] = {"r": np.zeros(E), "l": np.zeros(E, np.int64),
                                           "frames": np.zeros(E, np.int64)}
                        info["_episode"] = np.zeros(E, bool)
                    for key in ("r", "l", "frames"):
                        info["episode"][key][i] = inf["episode"][key]
                    info["_episode"][i] = True
                env.reset()
            self._obs[i] = env._frames.stack
        info.update(lives=lives, episode_frame_number=frame_no, raw_reward=raw,
                    life_lost=life_lost, game_over=game_over)
        if self.copy:
            return (self._obs.copy(), self._rewards.copy(), self._terminated.copy(),
                    self._truncated.copy(), info)
        return self._obs, self._rewards, self._terminated, self._truncated, info

    def close_extras(self, **kwargs):
        for env in self.envs:
            env.close()
