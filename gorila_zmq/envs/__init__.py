"""Environments for actors and evaluators: Atari (our ALE-based env), DeepMind Control tasks from
pixels (DrQ-v2) and gymnasium vector-observation tasks such as CartPole, behind one small vector
interface (`VecEnv`).

`env_spec(cfg)` says what the environment looks like (observation and replay-frame shapes, actions); the
agent reads it to configure its network (gorila_zmq.agents.base.prepare).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gorila_zmq.fields import ConfigError


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
    from gorila_zmq.envs.atari import UnknownGameError, UnsupportedGameError, resolve_game
    try:
        resolve_game(name)
        return True
    except UnsupportedGameError:
        return True                 # an Atari game still: opening it says why it cannot run
    except UnknownGameError:
        return False


@dataclass(frozen=True)
class EnvSpec:
    obs_shape: tuple          # what the network sees (4, 84, 84) / (4,)
    frame_shape: tuple        # what replay stores per step (84, 84) / (4,)
    stack: int                # frames per observation in replay
    dtype: np.dtype           # replay frame dtype
    n_actions: int            # discrete actions: how many (0 for continuous actions)
    atari: bool
    frames_per_step: int = 1  # emulator frames per agent step (the action repeat)
    action_dim: int = 0       # continuous actions: float vectors in [-1, 1]^action_dim (0 for discrete)
    dmc: bool = False

    @property
    def continuous(self) -> bool:
        return self.action_dim > 0


_SPEC_CACHE: dict = {}


def unknown_environment(name: str) -> str:
    """One line: the name is no Atari game, DMC task or gymnasium id; the closest of each."""
    import difflib

    import gymnasium as gym
    from gorila_zmq.envs.atari import _key, available_games
    games = {_key(g): g for g in available_games()}
    close = [games[c] for c in difflib.get_close_matches(_key(name), list(games), n=3, cutoff=0.6)]
    close += difflib.get_close_matches(name, list(gym.envs.registry), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (f"unknown environment {name!r}: not an Atari game, a DeepMind Control task (domain_task) or a "
            f"gymnasium id.{hint} ({len(games)} Atari games, e.g. pong, breakout; gymnasium ids such as CartPole-v1)")


def env_spec(cfg) -> EnvSpec:
    """What the configured environment looks like (opened once per process to learn it, then cached)."""
    key = (cfg.env.name, cfg.env.action_repeat)
    if key not in _SPEC_CACHE:
        if is_dmc(cfg.env.name):
            from gorila_zmq.envs.dmc import DMCEnv
            env = DMCEnv(cfg.env.name, frame_stack=3)
            n = int(env.action_space.shape[0])
            env.close()
            _SPEC_CACHE[key] = EnvSpec((9, 84, 84), (3, 84, 84), 3, np.dtype(np.uint8), 0, False,
                                       cfg.env.action_repeat, action_dim=n, dmc=True)
        elif is_atari(cfg.env.name):
            from gorila_zmq.envs.atari import AtariEnv
            env = AtariEnv(cfg.env.name, frame_skip=cfg.env.action_repeat)
            n = env.action_space.n
            env.close()
            _SPEC_CACHE[key] = EnvSpec((4, 84, 84), (84, 84), 4, np.dtype(np.uint8), int(n), True, cfg.env.action_repeat)
        else:
            import gymnasium as gym
            try:
                env = gym.make(cfg.env.name)
            except gym.error.Error:
                raise ConfigError(unknown_environment(cfg.env.name)) from None
            space = env.action_space
            shape = tuple(env.observation_space.shape)
            env.close()
            if isinstance(space, gym.spaces.Discrete):
                _SPEC_CACHE[key] = EnvSpec(shape, shape, 1, np.dtype(np.float32), int(space.n), False, 1)
            elif isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
                _SPEC_CACHE[key] = EnvSpec(shape, shape, 1, np.dtype(np.float32), 0, False, 1,
                                           action_dim=int(space.shape[0]))
            else:
                raise ValueError(f"{cfg.env.name}: action space {space} is neither discrete nor a vector")
    return _SPEC_CACHE[key]


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

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        obs, frames = [], []
        for e, env in enumerate(self.envs):
            o, _ = env.reset(seed=None if seed is None else seed + e)
            obs.append(np.asarray(o))
            frames.append(np.array(env.last_frame))
        return np.stack(obs), np.stack(frames)

    def step(self, actions) -> StepResult:
        obs, rew, term, trunc, frames = [], [], [], [], []
        res = StepResult(None, None, None, None, None)
        for e, env in enumerate(self.envs):
            a = actions[e]
            o, r, te, tr, info = env.step(int(a) if np.ndim(a) == 0 else a)
            self._ret[e] += info.get("raw_reward", r)
            self._len[e] += 1
            frames.append(np.array(env.last_frame))
            if te or tr:
                # Atari with life-loss terminals: the *game* goes on after a lost life.
                game_over = info.get("game_over", True) or tr
                if game_over:
                    res.finished_returns.append(float(self._ret[e]))
                    res.finished_lengths.append(int(self._len[e]))
                    self._ret[e], self._len[e] = 0.0, 0
                o, _ = env.reset()
                res.reset_frames[e] = np.array(env.last_frame)
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


class VectorObsEnv:
    """A gymnasium task with vector observations, given what our Atari and DeepMind Control envs have:
    `last_frame` (the newest observation, what replay stores), `raw_reward` in info, and training-time
    reward clipping (Atari clips inside AtariEnv)."""

    def __init__(self, env, clip_rewards: bool):
        self.env, self.clip = env, clip_rewards
        self.action_space, self.observation_space = env.action_space, env.observation_space
        self.last_frame = None

    def reset(self, **kw):
        o, info = self.env.reset(**kw)
        self.last_frame = np.asarray(o, np.float32)
        return o, info

    def step(self, a):
        o, r, te, tr, info = self.env.step(a)
        self.last_frame = np.asarray(o, np.float32)
        info["raw_reward"] = r
        return o, float(np.sign(r)) if self.clip else r, te, tr, info

    def close(self):
        self.env.close()


def make_env(cfg, *, evaluation: bool = False, seed: int | None = None):
    """One environment, set up for training or for the evaluation protocol."""
    if is_dmc(cfg.env.name):
        from gorila_zmq.envs.dmc import DMCEnv
        return DMCEnv(cfg.env.name, frame_stack=3, action_repeat=cfg.env.action_repeat,
                      fast_render=cfg.env.fast_render, seed=seed)
    if is_atari(cfg.env.name):
        from gorila_zmq.envs.atari import AtariEnv
        ev = cfg.eval
        return AtariEnv(cfg.env.name, frame_skip=cfg.env.action_repeat,
                        noop_max=ev.noop_max if evaluation else cfg.env.noop_max,
                        terminal_on_life_loss=False if evaluation else cfg.env.terminal_on_life_loss,
                        clip_rewards=False if evaluation else cfg.env.clip_rewards,
                        max_frames=ev.max_frames if evaluation else cfg.env.max_frames,
                        repeat_action_probability=0.0 if evaluation else cfg.env.repeat_action_probability,
                        # None: FIRE where the game has it; False: never
                        fire_reset=None if (ev.fire_reset if evaluation else cfg.env.fire_reset) else False,
                        seed=seed)
    import gymnasium as gym
    env = gym.make(cfg.env.name)
    env.action_space.seed(seed)
    wrapped = VectorObsEnv(env, cfg.env.clip_rewards and not evaluation)
    wrapped.reset(seed=seed)
    return wrapped


def make_vec_env(cfg, seed: int = 0, evaluation: bool = False) -> VecEnv:
    return VecEnv([make_env(cfg, evaluation=evaluation, seed=seed + e) for e in range(cfg.env.num_envs)],
                  is_atari(cfg.env.name))


def screen(env) -> np.ndarray | None:
    """The environment's current screen as an (H, W, 3) RGB array, or None where it has none (videos)."""
    from gorila_zmq.envs.atari import AtariEnv
    from gorila_zmq.envs.dmc import DMCEnv
    if isinstance(env, AtariEnv):
        return env.ale.getScreenRGB()
    if isinstance(env, DMCEnv):                  # (3, H, W) RGB
        return np.ascontiguousarray(env.last_frame.transpose(1, 2, 0))
    return None
