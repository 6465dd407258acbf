"""Dev mode end to end: `gorila-zmq dev` as a real process tree learning CartPole (bundled and global
replay), surviving SIGKILLed roles, and a Pong smoke run through every role. Slow tier."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, free_base_port, stop_proc, wait_for

pytestmark = pytest.mark.slow

THRESHOLD = 195.0
FRAME_BUDGET = 600_000            # env frames (all actors) by which CartPole must be solved
WALL_BUDGET = 240.0               # seconds, on 2 cores with every role running


def start_dev(run_dir, *overrides, preset="cartpole", duration=600):
    log = open(os.path.join(os.path.dirname(run_dir), "dev.log"), "ab")
    argv = [sys.executable, "-m", "gorila_zmq.cli", "dev", "--preset", preset, "--duration", str(duration),
            *(["--only-host", "127.0.0.2"] if any("placement" in o for o in overrides) else []),
            f"run.run_dir={run_dir}", f"net.base_port={free_base_port(64)}", "dev.progress_interval_s=5",
            *overrides]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def evaluations(run_dir):
    try:
        with open(os.path.join(run_dir, "evaluations.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def solved(run_dir, after=0.0):
    return [e for e in evaluations(run_dir) if e["return_mean"] >= THRESHOLD and e["wall_time"] >= after]


def pid_of(run_dir, name):
    try:
        return int(open(os.path.join(run_dir, "logs", f"{name}.pid")).read())
    except (OSError, ValueError):
        return None


def assert_clean_shutdown(dev, run_dir):
    pids = [pid_of(run_dir, os.path.basename(p)[:-4]) for p in glob.glob(os.path.join(run_dir, "logs", "*.pid"))]
    assert stop_proc(dev, signal.SIGTERM, timeout=60) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, \
            f"role process {pid} outlived the supervisor"
    run_id = json.load(open(os.path.join(run_dir, "config.json")))["run"]["run_id"] or None
    from gorila_zmq import config as C
    cfg = C.load(os.path.join(run_dir, "config.json"))
    assert not glob.glob(f"/dev/shm/gz_{cfg.run_id}_*"), "shared memory left behind"


def dump_logs(run_dir):
    out = []
    for p in sorted(glob.glob(os.path.join(run_dir, "logs", "*.log"))) + [os.path.join(os.path.dirname(run_dir), "dev.log")]:
        try:
            out.append(f"--- {p}\n" + open(p, errors="replace").read()[-3000:])
        except OSError:
            pass
    return "\n".join(out)


PRIORITIZED = ["agent.prioritized=true", "agent.priority_beta_updates=5000"]   # beta reaches 1 within the run


@pytest.mark.parametrize("layout", [
    # Two shards and two bundles, with the supervisor's restarts: once solved, an actor, a learner and a
    # shard are SIGKILLed, and the run must be solved again after they are back.
    pytest.param(["ps.shards=2", "roles.bundles=2", "ps.checkpoint_interval_s=1.0", "net.heartbeat_interval_s=0.5",
                  "dev.restart_backoff_s=0.5"], id="bundled-2shards-2bundles-then-killed-roles"),
    # Global mode in Ape-X's layout: actors that send their own initial priorities and spread epsilon,
    # one prioritized replay shard, one learner that writes |TD| back. Uniform global replay differs
    # only in the shard's sampler (tests/test_replay_service.py); its batches feed updates in the Pong
    # smoke and replay-shard-kill tests below. One CartPole run per mode and sampler, for time.
    pytest.param(["roles.mode=global", "roles.actors=2", "roles.replay_shards=1", "roles.learners=1",
                  *PRIORITIZED, "agent.actor_priorities=true", "dqn.eps_per_actor=true"], id="apex-style-prioritized"),
    pytest.param(["roles.bundles=1", *PRIORITIZED], id="bundled-prioritized"),
])
def test_cartpole_learns_in_dev_mode(tmp_path, layout, request):
    run_dir = str(tmp_path / "run")
    dev = start_dev(run_dir, *layout)
    t0 = time.monotonic()
    try:
        wait_for(lambda: solved(run_dir) or dev.poll() is not None, WALL_BUDGET, 1.0, "CartPole to be solved")
        got = solved(run_dir)
        assert got, "dev mode exited early:\n" + dump_logs(run_dir)
        first = got[0]
        assert first["env_frames"] <= FRAME_BUDGET, first
        print(f"solved after {time.monotonic() - t0:.0f}s, {first['env_frames']:,} frames, "
              f"{first['global_updates']:,} updates: {first['return_mean']:.1f}")
        assert os.path.exists(os.path.join(run_dir, "best.npz"))
        out = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "status", run_dir], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr
        for name in ("ps0", "actor0", "learner0", "evaluator"):
            assert f"{name} " in out.stdout and "DOWN" not in out.stdout, out.stdout
        assert glob.glob(os.path.join(run_dir, "tb", "learner0", "events.*"))
        if "agent.prioritized=true" in layout:      # priorities went back (and, Ape-X, came from the actors)
            stats = json.loads(subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "status", run_dir, "--json"],
                                              capture_output=True, text=True, timeout=60, cwd=ROOT).stdout)
            learner = stats["learner0"]
            tree = stats["replay0"] if "replay0" in stats else learner
            assert tree["priority_updates"] > 0 and tree["priority_max"] != 1.0, tree
            if "agent.actor_priorities=true" in layout:
                assert stats["replay0"]["initial_priorities"] > 0 and stats["actor0"]["replay"]["priorities_given"] > 0
        actor_csv = os.path.join(run_dir, "scalars", "actor0.csv")   # a row every dev.stats_interval_s
        wait_for(lambda: sum(1 for _ in open(actor_csv)) > 1, 60, 1.0, "a scalar row in actor0.csv")
        if "killed-roles" in request.node.callspec.id:
            supervisor_restarts_killed_roles_and_the_run_learns_on(dev, run_dir, tmp_path)
    except BaseException:
        print(dump_logs(run_dir))
        raise
    finally:
        assert_clean_shutdown(dev, run_dir)


def supervisor_restarts_killed_roles_and_the_run_learns_on(dev, run_dir, tmp_path):
    """An actor and a learner SIGKILLed, then a shard that has checkpointed: the supervisor restarts
    each, the shard re-adopts its live shared memory, and CartPole is solved again afterwards."""
    victims = {n: pid_of(run_dir, n) for n in ("actor0", "learner1")}
    for pid in victims.values():
        os.kill(pid, signal.SIGKILL)
    for n, old in victims.items():
        wait_for(lambda: pid_of(run_dir, n) not in (None, old), 60, 0.2, f"{n} to be restarted")
    from gorila_zmq.ps.state import load_checkpoint
    ck = os.path.join(run_dir, "ckpt", "ps1.npz")
    wait_for(lambda: os.path.exists(ck) and load_checkpoint(ck)[2]["version"] > 0, 60, 0.2,
             "shard 1 to checkpoint applied updates")
    ps1 = pid_of(run_dir, "ps1")
    os.kill(ps1, signal.SIGKILL)
    wait_for(lambda: pid_of(run_dir, "ps1") not in (None, ps1), 60, 0.2, "ps1 to be restarted")
    killed_at = time.time()
    from gorila_zmq.launch.status import collect, load_run
    from gorila_zmq.launch.program import make_program
    import zmq
    cfg = load_run(run_dir)
    ctx = zmq.Context()
    try:
        st = wait_for(lambda: (collect(cfg, [s for s in make_program(cfg) if s.name == "ps1"], ctx, 1.0)
                               .get("ps1")), 60, 0.5, "ps1 to answer")
    finally:
        ctx.destroy(linger=0)
    assert st["resumed_from"] == "segment" and st["version"] > 0
    wait_for(lambda: solved(run_dir, after=killed_at) or dev.poll() is not None, WALL_BUDGET, 1.0,
             "CartPole solved after the kills")
    assert solved(run_dir, after=killed_at), dump_logs(run_dir)
    log = open(os.path.join(tmp_path, "dev.log")).read()
    for n in ("actor0", "learner1", "ps1"):
        assert f"{n} killed by signal 9" in log, log[-3000:]


def test_replay_shard_killed_while_actors_wait_is_refilled_and_updates_resume(tmp_path):
    """Global mode with the replay-ratio limiter holding the actors at the learner's pace: a SIGKILLed
    replay shard restarts empty, so the learner cannot sample until the actors refill it, while the
    actors wait for updates. They step again once the global count has stalled for
    agent.limiter_stall_s, and the updates resume."""
    run_dir = str(tmp_path / "run")
    dev = start_dev(run_dir, "roles.mode=global", "roles.actors=2", "roles.replay_shards=1", "roles.learners=1",
                    "roles.evaluator=false", "agent.max_steps_per_update=1.0", "agent.learning_starts=1000",
                    "agent.limiter_stall_s=3", "dev.restart_backoff_s=0.5")
    from gorila_zmq.launch.status import collect, load_run
    from gorila_zmq.launch.program import make_program
    import zmq
    ctx = zmq.Context()
    try:
        wait_for(lambda: os.path.exists(os.path.join(run_dir, "config.json")), 60, 0.2, "the run's config")
        cfg = load_run(run_dir)
        ps0 = [s for s in make_program(cfg) if s.name == "ps0"]

        def version():
            return (collect(cfg, ps0, ctx, 1.0).get("ps0") or {}).get("version", -1)
        wait_for(lambda: version() >= 300, 120, 0.5, "300 global updates")
        old = pid_of(run_dir, "replay0")
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: pid_of(run_dir, "replay0") not in (None, old), 60, 0.2, "replay0 to be restarted")
        v0 = version()
        wait_for(lambda: version() >= v0 + 200, 120, 0.5, "updates after the replay shard restarted empty")
        assert "replay0 killed by signal 9" in open(os.path.join(tmp_path, "dev.log")).read()
    except BaseException:
        print(dump_logs(run_dir))
        raise
    finally:
        ctx.destroy(linger=0)
        assert_clean_shutdown(dev, run_dir)


def test_pong_smoke_through_every_role(tmp_path):
    """A few thousand Pong frames: Atari env + Cython preprocessing, global replay server, learner
    updates on the Nature CNN, parameter broadcast, and one capped evaluation episode."""
    run_dir = str(tmp_path / "run")
    dev = start_dev(run_dir, "env.name=Pong", "model.kind=auto", "env.clip_rewards=true",
                    "roles.mode=global", "roles.actors=1", "roles.replay_shards=1", "roles.learners=1",
                    "agent.replay_capacity=5000", "agent.learning_starts=500", "agent.batch_size=8",
                    "agent.n_step=1", "dqn.double_dqn=false", "eval.episodes=1", "eval.max_frames=400",
                    "eval.interval_s=1", "eval.epsilon=0.05", "env.max_frames=2000", preset="cartpole")
    try:
        from gorila_zmq import config as C

        def progressed():
            ev = evaluations(run_dir)
            st = os.path.join(run_dir, "scalars", "learner0.csv")
            return ev and os.path.exists(st) and "updates" in open(st).read()
        wait_for(lambda: progressed() or dev.poll() is not None, 240, 1.0, "Pong frames, updates and an evaluation")
        assert progressed(), dump_logs(run_dir)
        cfg = C.load(os.path.join(run_dir, "config.json"))
        assert cfg.model.kind == "nature_cnn" and cfg.model.n_actions == 6
        ev = evaluations(run_dir)[0]
        assert ev["human_normalized"] is not None and ev["episodes"] == 1
        assert ev["fire_reset"] is False and ev["epsilon"] == 0.05 and ev["max_frames"] == 400   # the protocol played
    except BaseException:
        print(dump_logs(run_dir))
        raise
    finally:
        assert_clean_shutdown(dev, run_dir)


def test_a_run_resumes_from_its_directory(tmp_path):
    run_dir = str(tmp_path / "run")
    dev = start_dev(run_dir, duration=25)
    assert dev.wait(120) == 0, dump_logs(run_dir)
    from gorila_zmq.roles.ps import load_checkpoint
    v1 = load_checkpoint(os.path.join(run_dir, "ckpt", "ps0.npz"))[2]["version"]
    frames1 = json.load(open(os.path.join(run_dir, "state", "actor0.json")))["env_frames"]
    assert v1 > 0 and frames1 > 0
    evals1 = len(evaluations(run_dir))
    # the second start names only the run directory: config, checkpoints and counters come from it
    restarted = time.time()
    log = open(os.path.join(tmp_path, "dev2.log"), "wb")
    dev = subprocess.Popen([sys.executable, "-m", "gorila_zmq.cli", "dev", "--duration", "20",
                            f"run.run_dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                           start_new_session=True)
    assert dev.wait(120) == 0, dump_logs(run_dir)
    out = open(os.path.join(tmp_path, "dev2.log")).read()
    assert "resuming the run" in out
    assert "(resumed)" in open(os.path.join(run_dir, "logs", "ps0.log")).read()
    v2 = load_checkpoint(os.path.join(run_dir, "ckpt", "ps0.npz"))[2]["version"]
    frames2 = json.load(open(os.path.join(run_dir, "state", "actor0.json")))["env_frames"]
    assert v2 > v1 and frames2 > frames1
    # the evaluator went on as well: new seeds, and up time that keeps counting from the first start's
    evals = evaluations(run_dir)
    assert evals1 >= 1 and any(e["wall_time"] > restarted for e in evals[evals1:]), evals
    assert len({e["seed"] for e in evals}) == len(evals), evals
    up = [e["run_seconds"] for e in evals]
    assert up == sorted(up) and up[evals1] > up[evals1 - 1], up


def test_two_hosts_split_by_placement(tmp_path):
    """Two supervisors, one per "host" (loopback addresses 127.0.0.2 for the shards, 127.0.0.3 for the
    rest), as the cluster launcher runs them: servers bind only their host's address, and the run
    learns across the two."""
    run_dir = str(tmp_path / "run")
    place = ["net.placement.ps0=127.0.0.2", "net.placement.ps1=127.0.0.2", "net.placement.actor0=127.0.0.3",
             "net.placement.learner0=127.0.0.3", "net.placement.evaluator=127.0.0.3"]
    shards = start_dev(run_dir, "ps.shards=2", *place, duration=600)
    wait_for(lambda: os.path.exists(os.path.join(run_dir, "config.json")), 60, 0.2, "the run's config")
    log = open(os.path.join(tmp_path, "dev-b.log"), "wb")
    rest = subprocess.Popen([sys.executable, "-m", "gorila_zmq.cli", "dev", "--only-host", "127.0.0.3",
                             "--duration", "600", f"run.run_dir={run_dir}"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)
    try:
        wait_for(lambda: solved(run_dir) or rest.poll() is not None or shards.poll() is not None, WALL_BUDGET, 1.0,
                 "CartPole across two hosts")
        assert solved(run_dir), dump_logs(run_dir)
        from gorila_zmq import config as C
        cfg = C.load(os.path.join(run_dir, "config.json"))
        for i in range(2):
            conns = [c for c in psutil.Process(pid_of(run_dir, f"ps{i}")).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]
            assert conns and all(c.laddr.ip == "127.0.0.2" for c in conns), conns   # not 0.0.0.0
        assert cfg.net.placement["ps0"] == "127.0.0.2"
    except BaseException:
        print(dump_logs(run_dir))
        raise
    finally:
        assert stop_proc(rest, signal.SIGTERM, timeout=60) == 0
        assert_clean_shutdown(shards, run_dir)
