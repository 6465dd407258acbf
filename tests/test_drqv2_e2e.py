"""DrQ-v2 on the runtime end to end: `gorila-zmq dev --agent drqv2` as a real process tree (a shard
with Adam, two actors rendering a DeepMind Control task, a global replay shard, one learner, the
evaluator), then `gorila-zmq eval` on the checkpoint it kept. Slow tier."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_base_port, wait_for
from test_dev_e2e import assert_clean_shutdown, dump_logs, evaluations

pytestmark = pytest.mark.slow
pytest.importorskip("dm_control")


def test_drqv2_smoke_through_every_role(tmp_path):
    run_dir = str(tmp_path / "run")
    log = open(tmp_path / "dev.log", "ab")
    dev = subprocess.Popen(
        [sys.executable, "-m", "gorila_zmq.cli", "dev", "--agent", "drqv2", "--env", "cartpole_swingup",
         "--duration", "600", f"run.run_dir={run_dir}", f"net.base_port={free_base_port(64)}",
         "agent.batch_size=8", "agent.replay_capacity=3000", "agent.learning_starts=200", "drqv2.seed_frames=400",
         "eval.interval_s=2", "eval.episodes=1", "dev.stats_interval_s=2", "dev.progress_interval_s=5"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        def frames(name):
            """The latest env_frames scalar an actor logged (every dev.stats_interval_s)."""
            try:
                rows = [line.split(",") for line in open(os.path.join(run_dir, "scalars", f"{name}.csv"))]
            except OSError:
                return 0
            return max([float(r[3]) for r in rows if len(r) == 4 and r[2] == "env_frames"], default=0)

        def progressed():
            st = os.path.join(run_dir, "scalars", "learner0.csv")
            learned = os.path.exists(st) and "updates" in open(st).read()
            ev = [e for e in evaluations(run_dir) if e["global_updates"] > 0]
            return learned and ev and all(frames(f"actor{i}") > 0 for i in (0, 1))
        wait_for(lambda: progressed() or dev.poll() is not None, 300, 1.0, "DrQ-v2 updates and an evaluation")
        assert progressed(), dump_logs(run_dir)
        ev = evaluations(run_dir)[-1]
        assert ev["episodes"] == 1 and "human_normalized" not in ev
        seeds = [e["seed"] for e in evaluations(run_dir)]
        assert len(set(seeds)) == len(seeds), seeds          # each evaluation plays new episodes
        cfg = json.load(open(os.path.join(run_dir, "config.json")))
        assert cfg["agent"]["name"] == "drqv2" and cfg["model"]["kind"] == "drqv2" and cfg["ps"]["optimizer"] == "adam"
        out = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "status", run_dir, "--json"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr
        st = json.loads(out.stdout)
        for name in ("ps0", "actor0", "actor1", "replay0", "learner0", "evaluator"):
            assert st.get(name), f"{name} did not answer: {out.stdout}"
        assert st["learner0"]["updates"] > 0 and st["learner0"]["push"]["lost"] == 0
        assert st["replay0"]["records_in"] > 0 and st["replay0"]["rejected_total"] == 0
        for a in ("actor0", "actor1"):          # 400 seed frames over 2 actors: 100 uniform steps each
            assert st[a]["seed_steps"] == 100, st[a]
            assert 0.1 <= st[a]["exploration_std"] <= 1.0
        assert st["ps0"]["version"] > 0 and st["ps0"]["rejected_total"] == 0
    except BaseException:
        print(dump_logs(run_dir))
        raise
    finally:
        assert_clean_shutdown(dev, run_dir)
    # `gorila-zmq eval` on best.npz with the seed of the evaluation that kept it plays that episode
    # again: the same return (DMC and the mean action are deterministic), so best.npz holds the theta
    # that was evaluated and both play by the same protocol.
    from gorila_zmq.roles.evaluator import load_params
    best = load_params(os.path.join(run_dir, "best.npz"))[1]
    assert best["return_mean"] == max(e["return_mean"] for e in evaluations(run_dir))
    video = tmp_path / "episode.mp4"
    out = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "eval", "--checkpoint",
                          os.path.join(run_dir, "best.npz"), "--episodes", "1", "--seed", str(best["seed"]),
                          "--video", str(video), "--json", str(tmp_path / "eval.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mean action" in out.stdout
    res = json.load(open(tmp_path / "eval.json"))
    assert res["episodes"] == 1 and res["seed"] == best["seed"]
    assert res["return_mean"] == pytest.approx(best["return_mean"], abs=1e-6), (res, best)
    assert video.stat().st_size > 10_000
