"""Environments for actors and evaluators: Atari (our ALE-based env), DeepMind Control tasks from
pixels (DrQ-v2) and gymnasium vector-observation tasks such as CartPole, behind one small vector
interface (`VecEnv`).

`spec(cfg)` says what the environment looks like (observation and replay-frame shapes, actions);
`resolve_model(cfg)` fills `model.*` from it when `model.kind = "auto"`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def is_dmc(name: str) -> bool:
    """A DeepMind Control task name (domain_task, e.g. cartpole_swingup). Names that look like one
    need the dmc extra: without it this raises the ImportError that says how to install it."""
    if "_" not in name or "-v" in name or "/" in name:
        return False
    from gorila_zmq.envs.dmc import UnknownTaskError, resolve_task
    try:
        resolve_task(name)
        return True
    except UnknownTaskError:
        return False


def is_atari(name: str) -> bool:
    """An ALE game in any spelling (Pong, ALE/Pong-v5, PongNoFrameskip-v4); else a gymnasium id."""
    from gorila_zmq.envs.atari import UnknownGameError, resolve_game
    try:
        resolve_game(name)
        return True
    except UnknownGameError:
        return False


@dataclass(frozen=True)
class EnvSpec:
    obs_shape: tuple          # what the network sees (4, 84, 84) / (4,)
    frame_shape: tuple        # what replay stores per step (84, 84) / (4,)
    stack: int                # frames per observation in replay
    dtype: np.dtype           # replay frame dtype
    n_actions: int            # discrete: the number of actions; continuous: the action dimension
    atari: bool
    frames_per_step: int = 1  # emulator frames per agent step (frame skip / action repeat)
    continuous: bool = False  # actions are float vectors in [-1, 1]^n_actions
    dmc: bool = False

    @property
    def action_shape(self) -> tuple:
        return (self.n_actions,) if self.continuous else ()

    @property
    def action_dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.continuous else np.dtype(np.int64)


_SPEC_CACHE: dict = {}


def spec(cfg) -> EnvSpec:
    key = (cfg.env.name, cfg.env.frame_skip)
    if key not in _SPEC_CACHE:
        if is_dmc(cfg.env.name):
            from gorila_zmq.envs.dmc import DMCEnv
            env = DMCEnv(cfg.env.name, frame_stack=3)
            n = int(env.action_space.shape[0])
            env.close()
            _SPEC_CACHE[key] = EnvSpec((9, 84, 84), (3, 84, 84), 3, np.dtype(np.uint8), n, False,
                                       cfg.env.frame_skip, continuous=True, dmc=True)
        elif is_atari(cfg.env.name):
            from gorila_zmq.envs.atari import AtariEnv
            env = AtariEnv(cfg.env.name, frame_skip=cfg.env.frame_skip)
            n = env.action_space.n
            env.close()
            _SPEC_CACHE[key] = EnvSpec((4, 84, 84), (84, 84), 4, np.dtype(np.uint8), int(n), True, cfg.env.frame_skip)
        else:
            import gymnasium as gym
            try:
                env = gym.make(cfg.env.name)
            except gym.error.Error as e:
                from gorila_zmq.envs.atari import available_games
                raise ValueError(f"unknown environment {cfg.env.name!r}: not an Atari game (available: "
                                 f"{', '.join(available_games())}) nor a gymnasium id ({e})") from None
            if not isinstance(env.action_space, gym.spaces.Discrete):
                raise ValueError(f"{cfg.env.name}: DQN needs a discrete action space, got {env.action_space}")
            shape = tuple(env.observation_space.shape)
            _SPEC_CACHE[key] = EnvSpec(shape, shape, 1, np.dtype(np.float32), int(env.action_space.n), False, 1)
            env.close()
    return _SPEC_CACHE[key]


def resolve_model(cfg):
    """Fill model.kind/obs_shape/n_actions from the environment when model.kind is 'auto'."""
    s = spec(cfg)
    if cfg.agent.name == "drqv2" and not s.continuous:
        raise ValueError(f"agent drqv2 needs continuous actions (a DeepMind Control task such as "
                         f"cartpole_swingup); {cfg.env.name} has {s.n_actions} discrete actions")
    if cfg.agent.name == "dqn" and s.continuous:
        raise ValueError(f"agent dqn needs discrete actions; {cfg.env.name} has continuous actions "
                         f"(use --agent drqv2)")
    if cfg.model.kind == "auto":
        cfg.model.kind = "drqv2" if cfg.agent.name == "drqv2" else "nature_cnn" if s.atari else "mlp"
    if cfg.model.kind == "nature_cnn" and not s.atari:
        raise ValueError(f"model.kind nature_cnn needs Atari frames; {cfg.env.name} has observations {s.obs_shape}")
    if (cfg.model.kind == "drqv2") != (cfg.agent.name == "drqv2"):
        raise ValueError(f"model.kind {cfg.model.kind} does not fit agent {cfg.agent.name}")
    cfg.model.obs_shape = list(s.obs_shape)
    cfg.model.n_actions = s.n_actions
    return cfg


@dataclass
class StepResult:
    obs: np.ndarray                 # (E, *obs_shape): the next observation (after a reset where one ended)
    reward: np.ndarray              # (E,) float32, clipped when training asks for it
    terminated: np.ndarray          # (E,) bool
    truncated: np.ndarray           # (E,) bool
    frames: np.ndarray              # (E, *frame_shape): the newest frame of the step (final frame if it ended)
    reset_frames: dict = field(default_factory=dict)     # env -> first frame of its new episode
    finished_returns: list = field(default_factory=list)  # raw returns of games that ended this step
    finished_lengths: list = field(default_factory=list)  # their lengths in agent steps


class VecEnv:
    """E environments stepped in turn (one process); finished episodes reset automatically."""

    def __init__(self, envs: list, atari: bool):
        self.envs, self.atari = envs, atari
        self.n = len(envs)
        self._ret = np.zeros(self.n)
        self._len = np.zeros(self.n, np.int64)

    def _frame(self, e: int, obs) -> np.ndarray:
        env = self.envs[e]
        return env.last_frame if hasattr(env, "last_frame") else np.asarray(obs, np.float32)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        obs, frames = [], []
        for e, env in enumerate(self.envs):
            o, _ = env.reset(seed=None if seed is None else seed + e)
            obs.append(np.asarray(o))
            frames.append(np.array(self._frame(e, o)))
        return np.stack(obs), np.stack(frames)

    def step(self, actions) -> StepResult:
        obs, rew, term, trunc, frames = [], [], [], [], []
        res = StepResult(None, None, None, None, None)
        for e, env in enumerate(self.envs):
            a = actions[e]
            o, r, te, tr, info = env.step(int(a) if np.ndim(a) == 0 else a)
            self._ret[e] += info.get("raw_reward", r)
            self._len[e] += 1
            frames.append(np.array(self._frame(e, o)))
            if te or tr:
                # Atari with life-loss terminals: the *game* goes on after a lost life.
                game_over = info.get("game_over", True) or tr
                if game_over:
                    res.finished_returns.append(float(self._ret[e]))
                    res.finished_lengths.append(int(self._len[e]))
                    self._ret[e], self._len[e] = 0.0, 0
                o, _ = env.reset()
                res.reset_frames[e] = np.array(self._frame(e, o))
            obs.append(np.asarray(o))
            rew.append(r)
            term.append(te)
            trunc.append(tr)
        res.obs, res.frames = np.stack(obs), np.stack(frames)
        res.reward = np.asarray(rew, np.float32)
        res.terminated, res.truncated = np.asarray(term, bool), np.asarray(trunc, bool)
        return res

    def close(self) -> None:
        for env in self.envs:
            env.close()


class _ClipReward:
    """Training-time reward clipping for gymnasium envs (Atari clips inside AtariEnv)."""

    def __init__(self, env):
        self.env = env
        self.action_space, self.observation_space = env.action_space, env.observation_space

    def reset(self, **kw):
        return self.env.reset(**kw)

    def step(self, a):
        o, r, te, tr, info = self.env.step(a)
        info["raw_reward"] = r
        return o, float(np.sign(r)), te, tr, info

    def close(self):
        self.env.close()


def make_env(cfg, *, evaluation: bool = False, seed: int | None = None):
    """One environment, set up for training or for the evaluation protocol."""
    if is_dmc(cfg.env.name):
        from gorila_zmq.envs.dmc import DMCEnv
        return DMCEnv(cfg.env.name, frame_stack=3, action_repeat=cfg.env.frame_skip,
                      fast_render=cfg.env.fast_render, seed=seed)
    if is_atari(cfg.env.name):
        from gorila_zmq.envs.atari import AtariEnv
        ev = cfg.eval
        return AtariEnv(cfg.env.name, frame_skip=cfg.env.frame_skip,
                        noop_max=ev.noop_max if evaluation else cfg.env.noop_max,
                        terminal_on_life_loss=False if evaluation else cfg.env.terminal_on_life_loss,
                        clip_rewards=False if evaluation else cfg.env.clip_rewards,
                        max_frames=ev.max_frames if evaluation else cfg.env.max_frames,
                        repeat_action_probability=0.0 if evaluation else cfg.env.repeat_action_probability,
                        seed=seed)
    import gymnasium as gym
    env = gym.make(cfg.env.name)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return _ClipReward(env) if cfg.env.clip_rewards and not evaluation else env


def make_vec_env(cfg, seed: int = 0, evaluation: bool = False) -> VecEnv:
    return VecEnv([make_env(cfg, evaluation=evaluation, seed=seed + e) for e in range(cfg.env.num_envs)],
                  is_atari(cfg.env.name))
