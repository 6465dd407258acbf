"""A third agent (tests/tiny_agent.py) runs through every role in dev mode, no role edited: shards,
a global replay shard, an actor, a learner and the evaluator, each reporting the agent's own counters.
Slow tier."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_base_port, stop_proc, wait_for

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))


def status(run_dir):
    out = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "status", run_dir, "--json"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {}


def test_a_third_agent_runs_through_every_role(tmp_path):
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "dev.log", "ab")
    dev = subprocess.Popen(
        [sys.executable, "-m", "gorila_zmq.cli", "dev", "--preset", "cartpole", "--duration", "300",
         "agent.name=tiny_agent:TinyAgent", "model.kind=auto", "roles.mode=global", "roles.actors=1",
         "roles.replay_shards=1", "roles.learners=1", "agent.learning_starts=200", "eval.interval_s=5",
         "eval.episodes=2", f"run.run_dir={run_dir}", f"net.base_port={free_base_port(64)}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    try:
        def every_role_did_its_part():
            st = status(run_dir)
            a, lr, rp, ev, ps = (st.get(k) or {} for k in ("actor0", "learner0", "replay0", "evaluator", "ps0"))
            return (a.get("tiny_acted", 0) > 0 and lr.get("tiny_updates", 0) > 5 and lr.get("tiny_int32_batches", 0) > 5
                    and rp.get("records_in", 0) > 200 and ps.get("version", 0) > 5 and ev.get("evaluations", 0) >= 1
                    and st)
        st = wait_for(every_role_did_its_part, 240, 2.0, "every role to run the tiny agent")
        cfg = json.load(open(os.path.join(run_dir, "config.json")))
        assert cfg["agent"]["name"] == "tiny_agent:TinyAgent" and cfg["model"]["kind"] == "tiny_linear"
        assert st["learner0"]["tiny_other_batches"] == 0                  # every batch held int32 actions
        assert st["replay0"]["rejected_total"] == 0 and st["ps0"]["rejected_total"] == 0
        assert "epsilon" not in st["actor0"]            # DQN's policy is nowhere in the actor
    except BaseException:
        for p in sorted(os.listdir(os.path.join(run_dir, "logs"))) if os.path.isdir(os.path.join(run_dir, "logs")) else []:
            print(f"--- {p}\n" + open(os.path.join(run_dir, "logs", p), errors="replace").read()[-2000:])
        raise
    finally:
        assert stop_proc(dev, timeout=60) == 0
