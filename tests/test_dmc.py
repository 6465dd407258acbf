"""DeepMind Control from pixels: shapes, action repeat, truncation at the time limit, fast rendering,
clear errors. Skips with the reason where dm_control (the dmc extra) or headless GL is missing."""
import os

import numpy as np
import pytest

dm_control = pytest.importorskip("dm_control", reason="the dmc extra (dm_control, mujoco) is not installed")


@pytest.fixture(scope="module")
def env_cls():
    from gorila_zmq.envs.dmc import DMCEnv
    try:
        DMCEnv("cartpole_swingup", seed=0).reset()
    except Exception as e:  # no EGL/OSMesa on this machine
        pytest.skip(f"headless MuJoCo rendering unavailable: {e}")
    return DMCEnv


def test_pixels_stack_and_truncation(env_cls):
    env = env_cls("cartpole_swingup", seed=1, time_limit=0.1)      # 10 physics steps = 5 agent steps
    obs, _ = env.reset(seed=1)
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8
    assert obs[6:].any() and (obs[:3] == obs[6:]).all() and (obs[3:6] == obs[6:]).all()   # the first frame repeated
    assert env.last_frame.shape == (3, 84, 84)
    steps, done = 0, False
    while not done:
        obs, r, term, trunc, _ = env.step(env.action_space.sample())
        steps += 1
        done = term or trunc
    assert steps == 5 and trunc and not term                          # the time limit truncates
    assert (obs[6:] == env.last_frame).all() and (obs[3:6] != 0).any()
    env.close()


def test_fast_render_turns_shadows_and_multisampling_off(env_cls):
    env = env_cls("cartpole_swingup", seed=0, fast_render=True)
    obs, _ = env.reset()
    m = env._env.physics.model
    assert m.vis.quality.shadowsize == 0 and m.vis.quality.offsamples == 0 and not m.light_castshadow.any()
    assert obs[6:].any()
    env.close()


def test_unknown_task_lists_the_available_ones():
    """Needs no rendering: the name is checked before any physics or context is made."""
    from gorila_zmq.envs.dmc import DMCEnv, UnknownTaskError
    with pytest.raises(UnknownTaskError, match="cartpole_swingup"):
        DMCEnv("cartpole_swingdown")


def test_agent_and_environment_must_fit(env_cls):
    from gorila_zmq import config as C
    from gorila_zmq.agents.base import prepare
    from gorila_zmq.envs import env_spec
    cfg = C.load(None, [], preset="drqv2")
    prepare(cfg)
    s = env_spec(cfg)
    assert cfg.model.kind == "drqv2" and cfg.model.obs_shape == [9, 84, 84] and cfg.model.action_dim == 1
    assert s.continuous and s.dmc and s.frame_shape == (3, 84, 84) and s.stack == 3 and s.frames_per_step == 2
    with pytest.raises(ValueError, match="--agent drqv2"):
        prepare(C.load(None, ["env.name=cartpole_swingup"]))          # dqn on continuous actions
    with pytest.raises(ValueError, match="continuous actions"):
        prepare(C.load(None, ["env.name=Pong"], preset="drqv2"))
    with pytest.raises(C.ConfigError, match="std_schedule"):
        C.load(None, ["drqv2.std_schedule=cosine(1,2)"], preset="drqv2")


def test_headless_rendering_falls_back_to_osmesa_without_egl():
    """With EGL made unusable (no vendor library), the backend probe picks osmesa and says why (runs
    where rendering itself is unavailable too: the probe is what decides)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    code = "from gorila_zmq.envs.dmc import pick_gl_backend; print(pick_gl_backend())"
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    broken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**env, "__EGL_VENDOR_LIBRARY_FILENAMES": "/nonexistent.json"})
    assert ok.stdout.strip() in ("egl", "osmesa")         # egl wherever a driver exists (here: yes)
    assert broken.stdout.strip() == "osmesa" and "falling back to MUJOCO_GL=osmesa" in broken.stderr
    assert subprocess.run([sys.executable, "-c", code], env={**env, "MUJOCO_GL": "glfw"}, capture_output=True,
                          text=True, timeout=120).stdout.strip() == "glfw"     # the user's choice wins


def test_replay_gives_the_learner_the_stacks_the_actor_saw(env_cls):
    """DrQ-v2's record: the first frame repeated before an episode (in DMCEnv and in replay alike) and
    only whole n-step windows, so no transition of the last n - 1 steps before the time limit."""
    from gorila_zmq import config as C
    from gorila_zmq.agents import base as agents
    from gorila_zmq.envs import env_spec
    from gorila_zmq.replay.memory import ReplayMemory
    cfg = C.load(None, ["agent.name=drqv2", "env.name=cartpole_swingup"])
    record = agents.prepare(cfg).record(env_spec(cfg))
    assert (record.stack_padding, record.full_windows) == ("repeat", True)
    env = env_cls("cartpole_swingup", seed=2, time_limit=0.12)          # 12 physics steps = 6 agent steps
    seen = [env.reset(seed=2)[0]]
    with ReplayMemory(50, n_step=3, gamma=0.99, **record.memory_args()) as rb:
        rb.start_episode(env.last_frame)
        done = False
        while not done:
            obs, r, term, trunc, _ = env.step(env.action_space.sample())
            rb.add(np.zeros(1, np.float32), r, env.last_frame, term, trunc)
            seen.append(obs)
            done = term or trunc
        assert len(seen) == 7 and trunc
        assert sorted(rb.valid_indices().tolist()) == [0, 1, 2, 3]     # steps 4 and 5 would be cut short
        b = rb.sample(64, np.random.default_rng(0))
        for i in range(64):
            t = int(b.index[i])
            np.testing.assert_array_equal(b.obs[i].reshape(9, 84, 84), seen[t])
            np.testing.assert_array_equal(b.next_obs[i].reshape(9, 84, 84), seen[t + 3])
    env.close()
    dqn = agents.prepare(C.load(None, ["env.name=Pong"])).record(env_spec(C.load(None, ["env.name=Pong"])))
    assert (dqn.stack_padding, dqn.full_windows) == ("zeros", False)   # as AtariEnv's stack; γ^k bootstraps
