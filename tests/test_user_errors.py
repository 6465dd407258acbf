"""A new user's mistakes end in one clear line and a non-zero exit: never a traceback, a restart loop
or a silent success. Real commands in real processes where the supervisor is involved."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, free_base_port
from gorila_zmq import config as C
from gorila_zmq.fields import ConfigError


def gz(*argv, timeout=120):
    """Run `gorila-zmq ARGV` in a process: (exit code, stdout + stderr)."""
    r = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", *argv], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    return r.returncode, r.stdout + r.stderr


def one_clear_line(out: str, *words):
    lines = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in out, out[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("override, words", [
    ("model.hidden=wide", ["model.hidden[0]", "expected int", "'wide'"]),
    ("model.hidden=[64,0]", ["positive sizes"]),
    ("agent.device=gpu", ["agent.device 'gpu'"]),
    ("eval.episodes=-3", ["eval.episodes"]),
    ("ps.bad_checkpoint=maybe", ["ps.bad_checkpoint"]),
])
def test_config_values_are_checked_element_by_element(override, words):
    with pytest.raises(ConfigError) as e:
        C.load(None, ["env.name=CartPole-v1", override])
    for w in words:
        assert w in str(e.value)


def test_a_list_field_takes_ints_in_any_spelling():
    assert C.load(None, ["model.hidden=128,64"]).model.hidden == [128, 64]
    assert C.load(None, ["model.hidden=[32]"]).model.hidden == [32]


def test_dev_with_a_bad_list_field_is_one_line(tmp_path):
    rc, out = gz("dev", "--preset", "cartpole", "model.hidden=wide", f"run.run_dir={tmp_path / 'run'}")
    assert rc == 2
    one_clear_line(out, "model.hidden[0]")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this host has CUDA")
def test_dev_on_cuda_without_cuda_stops_before_any_role_starts(tmp_path):
    rc, out = gz("dev", "--preset", "cartpole", "agent.device=cuda", f"run.run_dir={tmp_path / 'run'}",
                 f"net.base_port={free_base_port()}")
    assert rc == 2
    one_clear_line(out, "CUDA is not available")
    assert not os.path.exists(tmp_path / "run" / "logs" / "learner0.log")


def test_eval_refuses_a_negative_episode_count(tmp_path):
    rc, out = gz("eval", "--checkpoint", str(tmp_path / "best.npz"), "--episodes", "-3")
    assert rc == 2 and "--episodes: must be a whole number >= 1" in out and "Traceback" not in out


def test_a_role_that_exits_with_a_user_error_stops_the_run_with_its_message(make_cfg, tmp_path):
    """The supervisor gives up on a role that cannot run (exit code 2) instead of restarting it."""
    from gorila_zmq.launch.program import RoleSpec
    from gorila_zmq.launch.supervisor import GaveUp, Supervisor
    cfg = make_cfg("env.name=CartPole-v1")
    missing = str(tmp_path / "no-such-config.toml")
    sup = Supervisor(cfg, [RoleSpec("actor0", "actor", 0, ["actor", "--index", "0", "--config", missing], None, 0, 5)],
                     quiet=True)
    with pytest.raises(GaveUp) as e:
        sup.run(60)
    msg = str(e.value)
    assert "actor0 cannot run" in msg and "config file not found" in msg and sup.procs["actor0"].exits == [2]   # never restarted


@pytest.mark.slow
def test_a_role_failing_fast_every_time_stops_the_run(make_cfg, tmp_path, monkeypatch):
    from gorila_zmq.launch import supervisor as S
    from gorila_zmq.launch.program import RoleSpec
    monkeypatch.setattr(S, "FAST_FAILURES", 3)
    cfg = make_cfg("env.name=CartPole-v1", "dev.restart_backoff_s=0.1")
    crash = RoleSpec("actor0", "actor", 0, ["actor", "--index", "0", "--no-such-flag"], None, 0, 5)
    sup = S.Supervisor(cfg, [crash], quiet=True)
    # argparse exits 2 on an unknown flag: a user error, given up at once
    with pytest.raises(S.GaveUp):
        sup.run(60)
    # a role that dies of an unexpected error (exit 1) is retried, then given up after 3 fast failures
    boom = RoleSpec("actor0", "actor", 0, ["actor", "--index", "0", "run.run_dir=/proc/no/such/dir"], None, 0, 5)
    sup = S.Supervisor(cfg, [boom], quiet=True)
    with pytest.raises(S.GaveUp, match="3 times in a row"):
        sup.run(120)
    assert sup.procs["actor0"].exits == [1, 1, 1]


# -- environments -------------------------------------------------------------------------------

def test_unknown_names_suggest_the_closest_instead_of_listing_every_game():
    from gorila_zmq.envs import unknown_environment
    from gorila_zmq.envs.atari import UnknownGameError, resolve_game
    with pytest.raises(UnknownGameError) as e:
        resolve_game("Pongg")
    assert "Did you mean 'pong'" in str(e.value) and len(str(e.value)) < 300
    msg = unknown_environment("CartPol-v1")
    assert "'CartPole-v1'" in msg and len(msg) < 400


@pytest.mark.parametrize("game", ["combat", "joust", "maze_craze", "warlords"])
def test_games_ale_cannot_run_are_refused_before_ale_ends_the_process(game):
    from gorila_zmq.envs import is_atari
    from gorila_zmq.envs.atari import AtariEnv, UnsupportedGameError, available_games
    assert is_atari(game) and game not in available_games()
    with pytest.raises(UnsupportedGameError, match="ALE cannot run it"):
        AtariEnv(game)


ODD_SCREENS = ["adventure", "air_raid", "carnival", "journey_escape", "keystone_kapers", "king_kong", "klax",
               "laser_gates", "mr_do", "pacman", "pooyan", "sir_lancelot", "space_war"]


@pytest.mark.slow
def test_every_game_ale_runs_is_preprocessed_including_odd_screen_heights():
    from gorila_zmq.envs.atari import AtariEnv
    heights = set()
    for game in ODD_SCREENS:
        env = AtariEnv(game)
        obs, _ = env.reset(seed=0)
        for _ in range(3):
            obs, *_ = env.step(env.action_space.sample())
        assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
        heights.add(env.ale.getScreenDims()[0])
        env.close()
    assert heights >= {214, 220, 230, 250}, heights


@pytest.mark.parametrize("height", [214, 220, 230, 250])
def test_odd_heights_keep_exact_area_weights(height):
    cv2 = pytest.importorskip("cv2")
    from gorila_zmq.envs import frame as F
    rng = np.random.default_rng(height)
    a, b = (rng.integers(0, 256, (height, 160), dtype=np.uint8) for _ in range(2))
    t = F.area_tables((height, 160), (84, 84))
    assert t.wide and t.den == t.py * t.px
    ours = F.max_resize(a, b)
    ref = cv2.resize(np.maximum(a, b), (84, 84), interpolation=cv2.INTER_AREA)
    assert np.abs(ours.astype(int) - ref).max() <= 1 and (ours != ref).mean() < 0.01
    # against the exact rational sum, rounded half up: equal everywhere
    exact = (t.wy @ np.maximum(a, b).astype(np.int64) @ t.wx.T * 2 + t.den) // (2 * t.den)
    assert np.array_equal(ours, exact)
    stack = F.FrameStack((height, 160))
    stack.last[:] = np.maximum(a, b)
    stack.push(pooled=False)
    assert stack.impl == "numpy" and np.array_equal(stack.newest, exact)


# -- cleaning up after a run killed all at once ----------------------------------------------------

def test_clean_removes_a_dead_runs_segments_and_refuses_a_live_one(make_cfg):
    from gorila_zmq.host import shm
    cfg = make_cfg("env.name=CartPole-v1")
    os.makedirs(cfg.run.run_dir, exist_ok=True)
    C.save_json(cfg, os.path.join(cfg.run.run_dir, "config.json"))
    name = f"gz_{cfg.run_id}_ps0"
    seg = shm.create(name, 1 << 20, persist=True)        # what a SIGKILLed shard leaves
    try:
        rc, out = gz("clean", cfg.run.run_dir)              # still mapped here: a live run
        assert rc == 2 and "is live" in out and os.path.exists(f"/dev/shm/{name}")
    finally:
        seg.close()
    rc, out = gz("clean", "--stale", "--dry-run")
    assert rc == 0 and f"would remove /dev/shm/{name}" in out and os.path.exists(f"/dev/shm/{name}")
    rc, out = gz("clean", cfg.run.run_dir)
    assert rc == 0 and "removed 1 segment" in out and not os.path.exists(f"/dev/shm/{name}")


def test_dev_says_when_it_finds_segments_that_no_live_run_maps(make_cfg, capsys, caplog):
    from gorila_zmq.host import shm
    from gorila_zmq.launch.supervisor import _say_stale_segments
    cfg = make_cfg("env.name=CartPole-v1")
    mine, other = f"gz_{cfg.run_id}_ps0", f"gz_{cfg.run_id}x_ps0"
    for name in (mine, other):
        shm.create(name, 1 << 16, persist=True).close()
    try:
        with caplog.at_level("WARNING", "gorila_zmq.supervisor"):
            _say_stale_segments(cfg)
        assert "this run left behind" in capsys.readouterr().out
        assert "runs that are not live" in caplog.text and "gorila-zmq clean" in caplog.text
    finally:
        for name in (mine, other):
            shm.remove(name)
