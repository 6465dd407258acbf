"""Evaluation protocol: no-op starts, frame cap, epsilon, whole games, human normalisation, and
`gorila-zmq eval` on a saved checkpoint."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from gorila_zmq import config as C
from gorila_zmq.agents.base import prepare
from gorila_zmq.agents.dqn.agent import EpsilonGreedy
from gorila_zmq.envs import make_env
from gorila_zmq.envs.scores import human_normalized, summarize
from gorila_zmq.roles.evaluator import run_episodes, save_params


def test_human_normalisation_uses_the_nature_table_for_its_49_games():
    from gorila_zmq.envs.scores import NATURE_TABLE, ZOO_TABLE, normalization_table
    assert human_normalized("Pong", -20.7) == pytest.approx(0.0)
    assert human_normalized("pong", 9.3) == pytest.approx(100.0)          # Nature: human 9.3 (Zoo: 14.6)
    assert human_normalized("Breakout", 31.8) == pytest.approx(100.0)     # Nature: 1.7 / 31.8
    assert normalization_table("MontezumaRevenge") == (NATURE_TABLE, 0.0, 4366.7)
    assert normalization_table("UpNDown")[0] == NATURE_TABLE and normalization_table("VideoPinball")[1:] == (16256.9, 17297.6)
    # games outside the paper's 49 fall back to DQN Zoo's table and say so
    assert normalization_table("Skiing")[0] == ZOO_TABLE and human_normalized("Skiing", -17098.1) == pytest.approx(0.0)
    assert human_normalized("CartPole-v1", 100) is None and normalization_table("CartPole-v1") is None
    for spelling in ("PongNoFrameskip-v4", "ALE/Pong-v5", "pong"):
        assert human_normalized(spelling, 9.3) == pytest.approx(100.0), spelling
    s = summarize("Pong", [-21.0, -19.0])
    assert s["return_mean"] == -20.0 and s["human_normalized"] == pytest.approx(100 * 0.7 / 30.0)
    assert s["normalization_table"] == NATURE_TABLE


def test_nature_table_has_the_49_games_and_zoo_shares_their_random_scores():
    import csv
    from importlib import resources
    with resources.files("gorila_zmq.data").joinpath("nature_dqn_random_human.csv").open() as f:
        nature = {r["game"]: (float(r["random"]), float(r["human"])) for r in csv.DictReader(f)}
    with resources.files("gorila_zmq.data").joinpath("atari_random_human.csv").open() as f:
        zoo = {r["game"]: (float(r["random"]), float(r["human"])) for r in csv.DictReader(f)}
    assert len(nature) == 49 and all(h > r for r, h in nature.values())
    assert set(nature) <= set(zoo)
    assert all(zoo[g][0] == nature[g][0] for g in nature)                  # same random-play scores


def test_evaluation_env_follows_the_protocol():
    cfg = C.load(None, ["env.name=Breakout", "env.repeat_action_probability=0.0"])
    train = make_env(cfg, seed=0)
    ev = make_env(cfg, evaluation=True, seed=0)
    try:
        assert train._life_terminal and train._clip and train._max_frames == 108_000
        assert not ev._life_terminal and not ev._clip                   # whole games, raw rewards
        assert ev._max_frames == 18_000 and ev._noop_max == 30 and ev._sticky == 0.0
    finally:
        train.close()
        ev.close()


class Counting(torch.nn.Module):
    def __init__(self, n_actions):
        super().__init__()
        self.n_actions, self.calls = n_actions, 0

    def forward(self, x):
        self.calls += 1
        return torch.zeros(x.shape[0], self.n_actions)


def test_frame_cap_and_epsilon():
    cfg = C.load(None, ["env.name=Pong", "eval.max_frames=400"])
    m = Counting(6)
    rng = np.random.default_rng(1)
    returns = run_episodes(EpsilonGreedy(m, 6, 1.0, rng), cfg, episodes=2, seed=1)
    assert len(returns) == 2 and m.calls == 0          # epsilon 1: never asks the network
    returns = run_episodes(EpsilonGreedy(m, 6, 0.0, rng), cfg, episodes=1, seed=1)
    # capped at 400 emulator frames = 100 agent steps, minus the no-op start's frames
    assert 1 <= m.calls <= 100


def test_noop_starts_vary_the_first_observation():
    cfg = C.load(None, ["env.name=Seaquest"])
    # (Breakout and Pong show the same screen for the first 30 frames: nothing moves until the agent acts)
    firsts = set()
    for seed in range(6):
        env = make_env(cfg, evaluation=True, seed=seed)
        obs, info = env.reset(seed=seed)
        firsts.add(obs[-1].tobytes())                   # newest frame after the random no-ops
        env.close()
    assert len(firsts) > 1


def test_eval_command_on_a_saved_checkpoint(tmp_path):
    cfg = C.load(None, ["env.name=CartPole-v1", "model.kind=mlp", "model.hidden=[16]", "eval.episodes=2"])
    prepare(cfg)
    from gorila_zmq.ps.layout import ParamLayout
    from gorila_zmq.agents.base import build_network
    m = build_network(cfg)
    layout = ParamLayout.from_module(m)
    path = str(tmp_path / "best.npz")
    save_params(path, layout.flatten(m), layout, cfg, {"return_mean": 10.0})
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "eval", "--checkpoint", path, "--episodes", "3",
                        "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    per_episode = [float(line.rsplit(":", 1)[1]) for line in r.stdout.splitlines() if "  episode " in line]
    assert res["episodes"] == len(per_episode) == 3                      # the summary is of the episodes played
    assert res["return_mean"] == pytest.approx(sum(per_episode) / 3)
    assert (res["return_min"], res["return_max"]) == (min(per_episode), max(per_episode))
    r = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "eval", "--checkpoint", str(tmp_path / "nope.npz")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


def test_eval_writes_a_video_of_pong(tmp_path):
    cfg = C.load(None, ["env.name=Pong", "eval.max_frames=200", "eval.episodes=1"])
    prepare(cfg)
    from gorila_zmq.ps.layout import ParamLayout
    from gorila_zmq.agents.base import build_network
    m = build_network(cfg)
    layout = ParamLayout.from_module(m)
    path = str(tmp_path / "best.npz")
    save_params(path, layout.flatten(m), layout, cfg, {})
    video = tmp_path / "ep.mp4"
    r = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "eval", "--checkpoint", path, "--episodes", "1",
                        "--video", str(video)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert video.exists() and video.stat().st_size > 1000


def test_evaluation_presses_no_fire_at_reset_unless_asked():
    """The DQN/Gorila protocol: the agent presses FIRE itself; FireReset is a training option."""
    from gorila_zmq.roles.evaluator import protocol
    cfg = C.load(None, ["env.name=Breakout"])
    envs = [make_env(cfg, seed=0), make_env(cfg, evaluation=True, seed=0)]
    asked = C.load(None, ["env.name=Breakout", "eval.fire_reset=true", "env.fire_reset=false"])
    envs += [make_env(asked, seed=0), make_env(asked, evaluation=True, seed=0)]
    try:
        assert [e.fire_on_reset for e in envs] == [True, False, False, True]
        _, info = envs[1].reset(seed=3)
        noops = info["noops"]
        _, info = envs[3].reset(seed=3)                  # same no-ops, then FIRE and RIGHT: 2 agent steps more
        assert info["episode_frame_number"] == noops + 8
    finally:
        for e in envs:
            e.close()
    assert protocol(cfg) == {"epsilon": 0.05, "noop_max": 30, "max_frames": 18_000, "fire_reset": False}
    assert protocol(asked)["fire_reset"] is True
    assert "fire_reset" not in protocol(C.load(None, ["env.name=CartPole-v1"]))
