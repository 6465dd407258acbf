"""The Atari environment: DQN protocol details, checked against raw ALE and OpenCV."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

ale_py = pytest.importorskip("ale_py")
gym = pytest.importorskip("gymnasium")

from gorila_zmq.envs import frame  # noqa: E402
from gorila_zmq._native import try_load_ext  # noqa: E402
from gorila_zmq.envs.atari import (  # noqa: E402
    EVAL_MAX_FRAMES, TRAIN_MAX_FRAMES, AtariEnv, UnknownGameError, available_games, make_atari, resolve_game)
from gorila_zmq.envs.atari_vector import AtariVectorEnv  # noqa: E402

IMPLS = [pytest.param("cython", marks=pytest.mark.skipif(try_load_ext("frame") is None,
                                                         reason="kernel not built")), "numpy"]


def _play(env, actions):
    out = []
    for a in actions:
        out.append(env.step(a))
        if out[-1][2] or out[-1][3]:
            break
    return out


# -- names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,rom", [("Pong", "pong"), ("pong", "pong"), ("ALE/Pong-v5", "pong"),
                                      ("PongNoFrameskip-v4", "pong"), ("SpaceInvaders", "space_invaders"),
                                      ("space_invaders", "space_invaders"),
                                      ("ALE/MontezumaRevenge-v5", "montezuma_revenge")])
def test_game_names(name, rom):
    assert resolve_game(name) == rom


@pytest.mark.parametrize("name", ["Pongg", "", "NoSuchGame-v5"])
def test_unknown_game_is_a_clear_error(name):
    with pytest.raises(UnknownGameError) as e:
        AtariEnv(name)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "pong" in msg and "breakout" in msg and str(len(available_games())) in msg
    if name == "Pongg":
        assert "Did you mean 'pong'" in msg


# -- spaces, protocol defaults --------------------------------------------------------------------

def test_spaces_and_factory_protocols():
    env = make_atari("Pong")
    assert env.observation_space == gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert env.action_space == gym.spaces.Discrete(6)           # Pong's minimal action set
    assert env.get_action_meanings()[:2] == ["NOOP", "FIRE"]
    assert env._life_terminal and env._clip and env._max_frames == TRAIN_MAX_FRAMES
    assert env.ale.getFloat("repeat_action_probability") == 0.0
    ev = make_atari("pong", evaluation=True)
    assert not ev._life_terminal and not ev._clip and ev._max_frames == EVAL_MAX_FRAMES
    assert AtariEnv("pong", full_action_space=True).action_space.n == 18
    obs, info = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8 and obs.flags.c_contiguous
    assert set(info) >= {"lives", "episode_frame_number", "noops"}
    with pytest.raises(ValueError):
        env.step(6)


def test_gymnasium_env_checker():
    from gymnasium.utils.env_checker import check_env
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(make_atari("pong"), skip_render_check=True)


# -- the observation: frame skip, max-pool, resize, stack -----------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("luminance", ["ale", "rgb"])
def test_observation_matches_raw_ale_and_cv2(impl, luminance):
    """Replay the env's actions on a bare ALEInterface and preprocess with OpenCV."""
    import cv2
    from ale_py import roms
    env = AtariEnv("breakout", noop_max=0, fire_reset=False, luminance=luminance, frame_impl=impl)
    obs, info = env.reset(seed=1)
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(str(roms.get_rom_path("breakout")))
    ale.reset_game()
    acts = ale.getMinimalActionSet()

    def screen():
        if luminance == "rgb":
            return cv2.cvtColor(ale.getScreenRGB(), cv2.COLOR_RGB2GRAY)
        return ale.getScreenGrayscale()

    def reference(a, b):
        return cv2.resize(np.maximum(a, b), (84, 84), interpolation=cv2.INTER_AREA)

    first = reference(screen(), screen())
    assert not obs[:-1].any()                            # a new episode: zeros, then the first frame
    assert np.abs(obs[-1].astype(int) - first).max() <= 1
    rng = np.random.default_rng(0)
    prev_obs = obs
    for t in range(40):
        a = int(rng.integers(4))
        obs, r, term, trunc, info = env.step(a)
        for i in range(4):
            ale.act(acts[a])
            if i == 2:
                s3 = screen()
        want = reference(s3, screen())
        assert np.abs(obs[-1].astype(int) - want).max() <= 1, t
        np.testing.assert_array_equal(obs[:-1], prev_obs[1:])    # oldest -> newest
        np.testing.assert_array_equal(env.last_frame, obs[-1])
        assert not env.last_frame.flags.writeable
        assert info["episode_frame_number"] == ale.getEpisodeFrameNumber()
        prev_obs = obs
        if term or trunc:
            break


def test_both_implementations_give_identical_episodes():
    if try_load_ext("frame") is None:
        pytest.skip("kernel not built")
    envs = [make_atari("ms_pacman", frame_impl=impl) for impl in ("cython", "numpy")]
    obs = [e.reset(seed=5)[0] for e in envs]
    np.testing.assert_array_equal(obs[0], obs[1])
    rng = np.random.default_rng(5)
    for _ in range(60):
        a = int(rng.integers(envs[0].action_space.n))
        out = [e.step(a) for e in envs]
        np.testing.assert_array_equal(out[0][0], out[1][0])
        assert out[0][1:4] == out[1][1:4]


# -- resets: no-op starts, FIRE, seeding ----------------------------------------------------------

def test_noop_starts():
    env = make_atari("ms_pacman")                   # its screen changes during the first frames
    obs, info = env.reset(seed=0)
    noops, first = [info["noops"]], {info["noops"]: obs}
    for _ in range(24):
        obs, info = env.reset()
        n = info["noops"]
        assert info["episode_frame_number"] == n    # no FIRE in Ms. Pac-Man: just the no-ops
        if n in first:
            np.testing.assert_array_equal(obs, first[n])
        first[n] = obs
        noops.append(n)
    assert min(noops) >= 1 and max(noops) <= 30
    assert len(set(noops)) >= 8                     # uniform over 1..30
    assert len({o.tobytes() for o in first.values()}) >= 4      # different starts look different
    # the same seed gives the same start; another seed, another sequence
    a, b, c = make_atari("ms_pacman"), make_atari("ms_pacman"), make_atari("ms_pacman")
    seq = [[e.reset(seed=s)[1]["noops"]] + [e.reset()[1]["noops"] for _ in range(5)]
           for e, s in ((a, 3), (b, 3), (c, 4))]
    assert seq[0] == seq[1] != seq[2]
    # a seed given at construction acts like reset(seed=...)
    d = AtariEnv("ms_pacman", seed=3)
    assert [d.reset()[1]["noops"] for _ in range(6)] == seq[0]
    # noop_max=0: always the same deterministic start
    z = make_atari("ms_pacman", noop_max=0)
    o1, i1 = z.reset(seed=1)
    o2, i2 = z.reset()
    assert i1["noops"] == i2["noops"] == 0 and i1["episode_frame_number"] == 0
    np.testing.assert_array_equal(o1, o2)


def test_fire_reset():
    env = make_atari("breakout", noop_max=0)
    assert [a.name for a in env._fire] == ["FIRE", "RIGHT"]       # FIRE, then action 2
    obs, info = env.reset(seed=0)
    assert info["episode_frame_number"] == 8                      # two agent steps of 4 frames
    assert make_atari("breakout", fire_reset=False)._fire == ()
    assert make_atari("ms_pacman")._fire == ()                    # no FIRE action: nothing to press
    with pytest.raises(ValueError, match="FIRE"):
        make_atari("ms_pacman", fire_reset=True)


def test_step_after_game_over_needs_reset():
    env = make_atari("pong", max_frames=40)
    env.reset(seed=0)
    out = _play(env, [0] * 50)
    assert out[-1][3]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


# -- terminals, truncation, rewards ---------------------------------------------------------------

def test_life_loss_is_terminal_but_the_game_continues():
    env = make_atari("breakout")
    _, info = env.reset(seed=0)
    lives = info["lives"]
    assert lives == 5
    rng = np.random.default_rng(0)
    out = _play(env, rng.integers(0, 4, 2000))
    _, r, term, trunc, info = out[-1]
    assert term and not trunc and info["life_lost"] and not info["game_over"]
    assert info["lives"] == lives - 1 and "episode" not in info
    frame_no = info["episode_frame_number"]
    obs, rinfo = env.reset()
    assert rinfo["continued"] and rinfo["noops"] == 0 and rinfo["lives"] == lives - 1
    assert rinfo["episode_frame_number"] > frame_no               # the same game, not a new one
    assert not obs[:-1].any() and obs[-1].any()                   # but a fresh stack (zero-padded)
    # play on to the real end: only then a new game (5 lives, frame counter back near 0)
    for _ in range(lives - 1):
        out = _play(env, rng.integers(0, 4, 2000))
        assert out[-1][2]
        if out[-1][4]["game_over"]:
            break
        env.reset()
    info = out[-1][4]
    assert info["game_over"] and info["lives"] == 0 and info["episode"]["l"] > 0
    _, rinfo = env.reset()
    assert not rinfo["continued"] and rinfo["lives"] == 5 and rinfo["episode_frame_number"] < 50


def test_without_life_loss_terminals_lives_just_decrease():
    env = make_atari("breakout", evaluation=True)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    out = _play(env, rng.integers(0, 4, 400))
    lost = [o for o in out if o[4]["life_lost"]]
    assert lost and not any(o[2] for o in lost if not o[4]["game_over"])


def test_frame_cap_is_truncation():
    env = make_atari("pong", max_frames=200, noop_max=0)
    env.reset(seed=0)
    out = _play(env, [0] * 100)
    _, _, term, trunc, info = out[-1]
    assert trunc and not term and info["game_over"]
    assert info["episode_frame_number"] == 200
    assert info["episode"]["frames"] == 200
    assert not any(o[2] or o[3] for o in out[:-1])
    _, rinfo = env.reset()
    assert rinfo["episode_frame_number"] < 200 and not rinfo["continued"]


@pytest.mark.parametrize("clip", [True, False])
def test_reward_clipping(clip):
    env = make_atari("space_invaders", clip_rewards=clip, terminal_on_life_loss=False)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    out = _play(env, rng.integers(0, env.action_space.n, 600))
    raws = np.array([o[4]["raw_reward"] for o in out])
    rewards = np.array([o[1] for o in out])
    assert raws.max() > 1                                         # invaders are worth 5..30
    if clip:
        np.testing.assert_array_equal(rewards, np.sign(raws))
    else:
        np.testing.assert_array_equal(rewards, raws)


# -- the vector env -------------------------------------------------------------------------------

def test_vector_env_autoreset():
    venv = AtariVectorEnv("pong", 3, max_frames=120)
    obs, info = venv.reset(seed=10)
    assert obs.shape == (3, 4, 84, 84) and obs.dtype == np.uint8
    assert venv.single_observation_space.shape == (4, 84, 84)
    np.testing.assert_array_equal(venv.last_frames, obs[:, -1])
    finished = np.zeros(3, bool)
    prev = obs
    for t in range(40):
        obs, rew, term, trunc, info = venv.step(np.array([0, 1, 2]))
        assert rew.shape == term.shape == trunc.shape == (3,) and rew.dtype == np.float32
        done = term | trunc
        if done.any():
            np.testing.assert_array_equal(info["_final_obs"], done)
            for i in np.flatnonzero(done):
                final = info["final_obs"][i]
                np.testing.assert_array_equal(final[:-1], prev[i, 1:])     # the finished stack
                assert not obs[i, :-1].any()                               # the new episode's
                assert info["_episode"][i] and info["episode"]["frames"][i] == 120
            assert not info["final_obs"][~done].any()
            finished |= done
        for i in np.flatnonzero(~done):
            np.testing.assert_array_equal(obs[i, :-1], prev[i, 1:])
        prev = obs
    assert finished.all() and trunc.dtype == bool
    with pytest.raises(ValueError):
        venv.step([0, 1])
    venv.close()


def test_vector_env_seeding():
    a, b = AtariVectorEnv("ms_pacman", 2), AtariVectorEnv("ms_pacman", 2, copy=False)
    oa, ia = a.reset(seed=3)
    ob, ib = b.reset(seed=3)
    np.testing.assert_array_equal(oa, ob)
    np.testing.assert_array_equal(ia["noops"], ib["noops"])
    for _ in range(5):
        sa, sb = a.step([1, 2]), b.step([1, 2])
        np.testing.assert_array_equal(sa[0], sb[0])
    assert sb[0] is b.step([0, 0])[0]            # copy=False: the internal buffer
    single = make_atari("ms_pacman")
    assert single.reset(seed=4)[1]["noops"] == ia["noops"][1]      # env i is seeded seed + i
    c = AtariVectorEnv("ms_pacman", 2, seed=3)                     # the same, at construction
    np.testing.assert_array_equal(c.reset()[1]["noops"], ia["noops"])


def test_frame_stack_ring_is_shared_with_last_frame():
    env = make_atari("pong")
    obs, _ = env.reset(seed=0)
    view = env.obs_view
    np.testing.assert_array_equal(view, obs)
    obs2, *_ = env.step(0)
    np.testing.assert_array_equal(env.obs_view, obs2)
    np.testing.assert_array_equal(frame.max_resize(env._prev, env._last), env.last_frame)


def test_repeat_padding_is_an_option():
    env = AtariEnv("Pong", stack_padding="repeat", seed=0)
    obs, _ = env.reset()
    assert (obs == obs[-1]).all() and obs.any()
    env.close()
    with pytest.raises(ValueError, match="stack_padding"):
        AtariEnv("Pong", stack_padding="mirror")
