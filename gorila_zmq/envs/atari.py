"""Atari 2600 under the DQN protocol, built straight on ``ale_py.ALEInterface``.

One class does what the usual stack of wrappers (NoopReset, MaxAndSkip, EpisodicLife, FireReset,
WarpFrame, ClipReward, FrameStack) does, with the screens read into preallocated buffers and the
preprocessing done by the fused kernel of gorila_zmq.envs.frame:

- action repeat ``frame_skip`` (4), observation = max over the last two frames of the repeat;
- ALE's grayscale screen (or, with ``luminance="rgb"``, the RGB screen max-pooled then reduced
  with cv2's 0.299/0.587/0.114 weights: the Nature order), INTER_AREA resize to 84x84;
- a stack of the last ``frame_stack`` (4) frames, oldest -> newest, (4, 84, 84) uint8;
- on reset, 1..``noop_max`` (30) random no-op frames, then FIRE for games that wait for it
  (training only: the evaluation protocol presses nothing, ``fire_reset=False``);
- ``terminal_on_life_loss``: losing a life ends the episode (terminated=True) without resetting
  the game; the next reset() continues it (a no-op step, then FIRE) unless the game was over;
- ``clip_rewards``: reward = sign(raw reward); ``info["raw_reward"]`` keeps the score;
- no sticky actions (``repeat_action_probability=0``); episodes capped at ``max_frames``
  emulator frames (108,000 for training, 18,000 = 5 minutes for evaluation), reported as
  truncated=True, never terminated.

``make_atari(game)`` gives the training protocol, ``make_atari(game, evaluation=True)`` the
evaluation one. ``AtariVectorEnv`` steps several of them for batched inference.
"""
from __future__ import annotations

import difflib
import functools
import re
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
from ale_py import roms
from gymnasium import spaces

from gorila_zmq.envs.frame import FrameStack
from gorila_zmq.fields import ConfigError

TRAIN_MAX_FRAMES = 108_000
EVAL_MAX_FRAMES = 18_000


class UnknownGameError(ConfigError):
    """The name matches no game ALE can run; the message suggests the closest ones."""


class UnsupportedGameError(UnknownGameError):
    """A ROM ale-py ships that ALE cannot run (two-player-only games)."""


@functools.lru_cache(maxsize=1)
def available_games() -> list[str]:
    """ROM ids ale-py ships that ALE can run, e.g. 'pong', 'space_invaders'."""
    return sorted(g for g in roms.get_all_rom_ids() if g not in unsupported_games())


@functools.lru_cache(maxsize=1)
def unsupported_games() -> frozenset[str]:
    """ROMs ale-py ships that ALE refuses to load (two-player-only games: combat, joust, maze_craze,
    warlords). ALE's loadROM ends the whole process on them, so they are refused before it."""
    from ale_py import ALEInterface
    return frozenset(g for g in roms.get_all_rom_ids() if not ALEInterface.isSupportedROM(str(roms.get_rom_path(g))))


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def resolve_game(name: str) -> str:
    """The ROM id for 'Pong', 'pong', 'ALE/Pong-v5', 'PongNoFrameskip-v4', 'SpaceInvaders',
    'space_invaders', ...; UnknownGameError (a ValueError) listing the available ones otherwise."""
    names = available_games()
    games = {_key(g): g for g in names}
    s = name.strip().split("/")[-1] if isinstance(name, str) else ""    # "ALE/Pong-v5" -> "Pong-v5"
    s = re.sub(r"-v\d+$", "", s)                                          # -> "Pong"
    s = re.sub(r"(NoFrameskip|Deterministic)$", "", s)                    # gym v4-style suffixes
    if _key(s) in games:
        return games[_key(s)]
    refused = {_key(g): g for g in unsupported_games()}
    if _key(s) in refused:
        raise UnsupportedGameError(f"{refused[_key(s)]!r} is a ROM ale-py ships, but ALE cannot run it (a game for "
                               f"two players only; ALE refuses {', '.join(sorted(refused.values()))})")
    close = difflib.get_close_matches(_key(s), list(games), n=3, cutoff=0.6) if s else []
    hint = f" Did you mean {', '.join(repr(games[c]) for c in close)}?" if close else ""
    raise UnknownGameError(f"unknown Atari game {name!r}.{hint} ({len(names)} games are available, e.g. pong, "
                           "breakout, space_invaders; ale_py.roms.get_all_rom_ids() lists them)")


class AtariEnv(gym.Env):
    """One Atari game under the DQN protocol (see the module docstring); defaults = training.

    After every step() and reset(), ``last_frame`` is the newest processed (84, 84) frame, the
    last plane of the observation, as a read-only view (valid until the next step/reset: copy it
    to keep it). An actor writing a frame-deduplicated replay stores just that frame.

    info (step): lives, episode_frame_number (emulator frames since the game's reset), raw_reward
    (unclipped), life_lost, game_over (the game itself ended: terminated by the game or truncated
    by the cap; with life-loss terminals, terminated can be True while game_over is False), and
    when game_over, episode = {"r": raw score of the whole game, "l": agent steps, "frames": ...}.
    info (reset): lives, episode_frame_number, noops (no-op frames taken; 0 when the reset
    continued the game after a life-loss terminal), continued (True in that case).

    Arguments beyond the protocol's: ``screen_size`` (int or (h, w); the exact integer resize
    supports 84x84 and other sizes whose area weights have small denominators), ``full_action_space``
    (18 actions instead of the game's minimal set), ``mode``/``difficulty`` (ALE game variants),
    ``render_mode="rgb_array"``, ``frame_impl`` (None: the compiled kernel unless
    GORILA_PUREPYTHON=1; "cython" or "numpy" to force one, for benchmarks and tests), ``seed``
    (seeds the env now, so that a first reset() without a seed equals reset(seed=seed)).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 60}

    def __init__(self, game: str, *, frame_skip: int = 4, frame_stack: int = 4,
                 screen_size: int | tuple[int, int] = 84, noop_max: int = 30,
                 fire_reset: bool | None = None, terminal_on_life_loss: bool = True,
                 clip_rewards: bool = True, max_frames: int | None = TRAIN_MAX_FRAMES,
                 repeat_action_probability: float = 0.0, full_action_space: bool = False,
                 luminance: str = "ale", mode: int | None = None, difficulty: int | None = None,
                 render_mode: str | None = None, frame_impl: str | None = None,
                 seed: int | None = None, stack_padding: str = "zeros"):
        if frame_skip < 1 or frame_stack < 1 or noop_max < 0:
            raise ValueError("frame_skip and frame_stack must be >= 1, noop_max >= 0")
        if max_frames is not None and max_frames < 1:
            raise ValueError("max_frames must be >= 1 (or None for no cap)")
        if luminance not in ("ale", "rgb"):
            raise ValueError(f"luminance must be 'ale' or 'rgb', not {luminance!r}")
        if stack_padding not in ("zeros", "repeat"):
            raise ValueError(f"stack_padding must be 'zeros' or 'repeat', not {stack_padding!r}")
        self._padding = stack_padding
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', not {render_mode!r}")
        self.game = resolve_game(game)
        self._rom = roms.get_rom_path(self.game)
        self._skip = frame_skip
        self._noop_max = noop_max
        self._life_terminal = terminal_on_life_loss
        self._clip = clip_rewards
        self._max_frames = max_frames or 0
        self._sticky = float(repeat_action_probability)
        self._mode, self._difficulty = mode, difficulty
        self.render_mode = render_mode

        self.ale = ale_py.ALEInterface()
        self.ale.setLoggerMode(ale_py.LoggerMode.Error)
        if seed is not None:            # as reset(seed=seed), without the second ROM load
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            self._load(int(self._np_random.integers(2**31 - 1)))
        else:
            self._load(int(np.random.SeedSequence().generate_state(1)[0] >> 1))
        self._actions = list(self.ale.getLegalActionSet() if full_action_space
                             else self.ale.getMinimalActionSet())
        self._noop = ale_py.Action.NOOP
        meanings = self.get_action_meanings()
        can_fire = "FIRE" in meanings and len(meanings) >= 3
        if fire_reset and not can_fire:
            raise ValueError(f"fire_reset=True, but {self.game} has no FIRE action")
        # As the usual FireResetEnv: press FIRE, then action 2, each a full agent step.
        self._fire = ((self._actions[meanings.index("FIRE")], self._actions[2])
                      if (can_fire if fire_reset is None else fire_reset) else ())

        h, w = self.ale.getScreenDims()
        self._frames = FrameStack((h, w), screen_size, frame_stack, rgb=luminance == "rgb",
                                  impl=frame_impl)
        self._grab = self.ale.getScreenRGB if luminance == "rgb" else self.ale.getScreenGrayscale
        self._prev, self._last = self._frames.prev, self._frames.last

        self.action_space = spaces.Discrete(len(self._actions))
        self.observation_space = spaces.Box(0, 255, self._frames.stack.shape, dtype=np.uint8)
        self._lives = 0
        self._game_over = True          # no game running yet: the first reset() starts one
        self._life_ended = False        # the last step was a life-loss terminal
        self._ep_return = 0.0
        self._ep_steps = 0

    # -- gymnasium API --------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._load(int(self.np_random.integers(2**31 - 1)))
            self._game_over = True
        if self._life_ended and not self._game_over:
            info = self._continue()
        else:
            info = self._new_game()
        self._life_ended = False
        return self._frames.stack.copy(), info

    def step(self, action):
        reward, terminated, truncated, info = self._step(action)
        return self._frames.stack.copy(), reward, terminated, truncated, info

    def render(self):
        if self.render_mode == "rgb_array":
            return self.ale.getScreenRGB()
        return None

    def get_action_meanings(self) -> list[str]:
        return [a.name for a in self._actions]

    @property
    def last_frame(self) -> np.ndarray:
        """The newest processed frame (read-only view, valid until the next step/reset)."""
        return self._frames.newest

    @property
    def obs_view(self) -> np.ndarray:
        """The current observation without a copy (read-only view, valid until the next step)."""
        return self._frames.stack

    # -- internals --------------------------------------------------------------------------------

    def _start_stack(self) -> None:
        # "zeros" (default): the replay memory zero-fills frames before an episode's start, so the
        # learner sees exactly the stacks the actor acted on; "repeat": gymnasium's padding.
        if self._padding == "zeros":
            self._frames.clear_older()
        else:
            self._frames.fill()

    def _load(self, ale_seed: int) -> None:
        """(Re)load the ROM with its settings; ALE reads them at load time."""
        ale = self.ale
        ale.setInt("random_seed", ale_seed)
        ale.setFloat("repeat_action_probability", self._sticky)
        ale.setInt("max_num_frames_per_episode", self._max_frames)
        ale.loadROM(str(self._rom))
        if self._mode is not None:
            ale.setMode(self._mode)
        if self._difficulty is not None:
            ale.setDifficulty(self._difficulty)

    def _advance(self, action) -> tuple[int, bool]:
        """One agent step: repeat `action`, read the last two screens, push the pooled frame.
        Returns (raw reward, game over). A game that ends early is observed on its last frame."""
        ale, skip, grab = self.ale, self._skip, self._grab
        reward = 0
        for i in range(skip):
            reward += ale.act(action)
            if ale.game_over():
                grab(self._last)
                # prev holds frame skip-2 only when the game ended on the repeat's last frame
                self._frames.push(skip > 1 and i == skip - 1)
                return reward, True
            if i == skip - 2:
                grab(self._prev)
        grab(self._last)
        self._frames.push(skip > 1)
        return reward, False

    def _step(self, action) -> tuple[float, bool, bool, dict]:
        """step() without building the observation (the vector env copies the stack itself)."""
        if not 0 <= action < len(self._actions):
            raise ValueError(f"action {action!r} outside 0..{len(self._actions) - 1}")
        if self._game_over:
            raise RuntimeError("the game is over: call reset() before step()")
        self._life_ended = False        # reset() continues a game only right after a life-loss terminal
        raw, over = self._advance(self._actions[action])
        self._ep_return += raw
        self._ep_steps += 1
        ale = self.ale
        lives = ale.lives()
        life_lost = lives < self._lives
        terminated = truncated = False
        if over:
            terminated = ale.game_over(with_truncation=False)
            truncated = not terminated
            self._game_over = True
        # As EpisodicLifeEnv: lives == 0 is left to the game's own game over (Q*bert lingers there).
        if self._life_terminal and 0 < lives < self._lives:
            terminated = True
            self._life_ended = True
        self._lives = lives
        frame_no = ale.getEpisodeFrameNumber()
        info = {"lives": lives, "episode_frame_number": frame_no, "raw_reward": float(raw),
                "life_lost": life_lost, "game_over": over}
        if over:
            info["episode"] = {"r": self._ep_return, "l": self._ep_steps, "frames": frame_no}
        reward = float((raw > 0) - (raw < 0)) if self._clip else float(raw)
        return reward, terminated, truncated, info

    @property
    def fire_on_reset(self) -> bool:
        """Whether reset() (and a continue after a lost life) presses FIRE, then action 2."""
        return bool(self._fire)

    def _new_game(self) -> dict:
        ale = self.ale
        ale.reset_game()
        noops = int(self.np_random.integers(1, self._noop_max + 1)) if self._noop_max else 0
        for _ in range(noops):
            ale.act(self._noop)
            if ale.game_over():
                ale.reset_game()
        self._grab(self._last)
        self._frames.push(False)
        self._game_over = False
        self._ep_return, self._ep_steps = 0.0, 0
        if self._fire and self._press_fire():
            return self._new_game()
        self._start_stack()
        self._lives = ale.lives()
        return {"lives": self._lives, "episode_frame_number": ale.getEpisodeFrameNumber(),
                "noops": noops, "continued": False}

    def _continue(self) -> dict:
        """After a life-loss terminal: a no-op step (and FIRE) instead of a reset."""
        raw, over = self._advance(self._noop)
        self._ep_return += raw
        if over or (self._fire and self._press_fire()):
            return self._new_game()
        self._start_stack()
        self._lives = self.ale.lives()
        return {"lives": self._lives, "episode_frame_number": self.ale.getEpisodeFrameNumber(),
                "noops": 0, "continued": True}

    def _press_fire(self) -> bool:
        """The FireReset presses; True when the game ended meanwhile (then start a new one)."""
        for action in self._fire:
            raw, over = self._advance(action)
            self._ep_return += raw
            if over:
                return True
        return False


def make_atari(game: str, *, evaluation: bool = False, **overrides) -> AtariEnv:
    """The DQN protocol: training = life-loss terminals, rewards clipped to their sign, episodes
    capped at 108,000 frames, FIRE pressed at reset where the game has it; evaluation = whole games,
    raw rewards, 18,000 frames (5 minutes), nothing pressed at reset.
    Both: up to 30 no-op starts, no sticky actions, frame skip 4 with max-pooling, 84x84, stack 4.
    Keyword overrides go to AtariEnv."""
    kw: dict[str, Any] = dict(terminal_on_life_loss=not evaluation, clip_rewards=not evaluation,
                              max_frames=EVAL_MAX_FRAMES if evaluation else TRAIN_MAX_FRAMES)
    if evaluation:
        kw["fire_reset"] = False         # the protocol presses nothing at reset: the agent must fire
    kw.update(overrides)
    return AtariEnv(game, **kw)
