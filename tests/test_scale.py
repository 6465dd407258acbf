"""Scale: the cost model (launch/scale.py) and `gorila-zmq scale plan`, the shared-memory total check,
and the `paper` preset scaled down through every role (slow)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_base_port, wait_for
from gorila_zmq.launch.scale import Costs, Layout, predict

NATURE = 1_687_206


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gorila_zmq.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_model_never_exceeds_what_the_learners_generate_and_saturates():
    c = Costs()
    rates = []
    for n in (1, 2, 4, 8, 16, 32, 64, 100):                       # one relay per 25 learners
        p = predict(Layout(learners=n, shards=4, params=NATURE, update_ms=20.0, subscribers=-(-n // 25)), c)
        assert p.updates_per_s <= n / 0.020 + 1e-6
        rates.append(p.updates_per_s)
    assert rates[:4] == sorted(rates[:4]) and rates[3] > 3 * rates[0]   # more learners, more updates ...
    assert rates[-1] < 1.05 * rates[-2]                           # ... until a resource saturates
    assert "learner compute" in predict(Layout(learners=1, shards=1, params=NATURE), c).bottleneck


def test_model_staleness_policies_at_the_papers_size():
    """100 learners: a count bound of 50 throws most gradients away; the age bound keeps them."""
    lay = Layout(learners=100, shards=31, params=NATURE, update_ms=2.5, link_bps=10e9, cluster=True,
                 subscribers=100)
    free = predict(lay)
    assert free.staleness_p50 > 90
    counted = predict(Layout(**{**lay.__dict__, "max_staleness": 50}))
    aged = predict(Layout(**{**lay.__dict__, "max_staleness_s": 2.0}))
    assert counted.discard_fraction > 0.3
    assert aged.discard_fraction < 0.05
    assert counted.updates_per_s < aged.updates_per_s


def test_model_bytes_follow_grad_dtype_grads_per_push_and_the_fan_out():
    base = Layout(learners=16, shards=4, params=NATURE, update_ms=20.0, link_bps=1e9, cluster=True)
    f32 = predict(base)
    bf16 = predict(Layout(**{**base.__dict__, "grad_bytes": 2}))
    k4 = predict(Layout(**{**base.__dict__, "grads_per_push": 4, "update_ms": 5.0}))
    assert bf16.shard_bytes_in_per_s / bf16.pushes_per_s == pytest.approx(
        f32.shard_bytes_in_per_s / f32.pushes_per_s / 2)
    assert bf16.updates_per_s > 1.5 * f32.updates_per_s          # on 1 Gb/s the link is the wall
    assert "link" in f32.bottleneck
    assert 4 * k4.pushes_per_s > 2 * f32.pushes_per_s              # k = 4: gradients per byte x 4
    many = predict(Layout(**{**base.__dict__, "learners": 100, "subscribers": 200, "link_bps": 10e9}))
    relay = predict(Layout(**{**base.__dict__, "learners": 100, "subscribers": 25, "link_bps": 10e9}))
    assert "fan-out reaches only" in many.bottleneck              # 200 subscribers: the shard's link out
    assert many.staleness_p50 > relay.staleness_p50                # ... so their view of theta lags


def test_scale_plan_cli():
    r = cli("scale", "plan", "--learners", "100", "--shards", "31", "--params", "1.69M", "--link", "10gbit",
            "--update-ms", "2.5")
    assert r.returncode == 0, r.stderr
    assert "applied updates/s" in r.stdout and "bottleneck" in r.stdout and "shards for 90%" in r.stdout
    j = cli("scale", "plan", "--learners", "4", "--shards", "2", "--params", "1e6", "--json")
    assert j.returncode == 0 and json.loads(j.stdout)["prediction"]["updates_per_s"] > 0
    bad = cli("scale", "plan", "--learners", "4", "--shards", "2", "--params", "lots")
    assert bad.returncode == 2 and "not a number" in bad.stderr


def test_paper_preset_on_one_host_is_refused_before_any_role_starts(tmp_path):
    """100 replays of 1 M frames (about 707 GB) cannot fit in /dev/shm: one clear error naming the total
    and the fixes, and no role process was started."""
    run_dir = tmp_path / "run"
    r = cli("dev", "--preset", "paper", f"run.run_dir={run_dir}", f"net.base_port={free_base_port(64)}")
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr
    assert "GiB of shared memory" in err and "100 replay memories" in err and "roles.bundles" in err \
        and "agent.replay_capacity" in err and "cluster" in err, err
    assert not (run_dir / "logs").exists() or not list((run_dir / "logs").glob("*.pid"))


def test_shared_memory_plan_counts_every_segment(make_cfg):
    from gorila_zmq.launch.program import check_shared_memory, make_program, prepare_run, shared_memory_plan
    from gorila_zmq.fields import ConfigError
    cfg = make_cfg("env.name=CartPole-v1", "model.kind=auto", "roles.bundles=3", "ps.shards=2",
                   "agent.replay_capacity=20000", "agent.learning_starts=100", "net.param_relay=true")
    prepare_run(cfg)
    prog = make_program(cfg)
    plan = shared_memory_plan(cfg, prog)
    assert sorted(plan) == ["actor0", "actor1", "actor2", "ps0", "ps1", "relay0"]
    assert check_shared_memory(cfg, prog) == sum(plan.values())
    with pytest.raises(ConfigError, match="shared memory"):
        check_shared_memory(cfg, prog, shm_dir=str(_tiny_tmpfs_or_skip()))


def _tiny_tmpfs_or_skip():
    """A directory whose filesystem has less free space than the plan needs: a 1 MB tmpfs (root)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="gz-tiny-")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    import atexit
    atexit.register(lambda: subprocess.run(["umount", d]))
    return d


@pytest.mark.slow
def test_paper_preset_scaled_down_runs_through_every_role(tmp_path):
    """The paper's layout at a size one host holds: 31 shards, 8 bundles, a relay, the evaluator, on
    CartPole with a small replay, bfloat16 gradients and 2 minibatches per push. Every role answers,
    every shard applies updates, and the age bound discards none of the honest gradients."""
    from gorila_zmq import config as C
    from gorila_zmq.launch.program import make_program
    from gorila_zmq.launch.status import collect
    import zmq
    run_dir = tmp_path / "run"
    log = open(tmp_path / "dev.log", "wb")
    dev = subprocess.Popen([sys.executable, "-m", "gorila_zmq.cli", "dev", "--preset", "paper", "--duration", "300",
                            f"run.run_dir={run_dir}", f"net.base_port={free_base_port(64)}", "roles.bundles=8",
                            "env.name=CartPole-v1", "model.kind=auto", "env.clip_rewards=false",
                            "agent.replay_capacity=4000", "agent.learning_starts=200", "agent.batch_size=32",
                            "net.grad_dtype=bfloat16", "agent.grads_per_push=2", "eval.interval_s=5",
                            "eval.episodes=1", "ps.checkpoint_interval_s=0", "dev.progress_interval_s=5"],
                           stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    ctx = zmq.Context()
    try:
        wait_for(lambda: (run_dir / "config.json").exists() or dev.poll() is not None, 120, 0.5, "the run to start")
        cfg = C.load(str(run_dir / "config.json"))
        prog = make_program(cfg)
        assert len([p for p in prog if p.role == "ps"]) == 31 and [p.name for p in prog if p.role == "relay"] == ["relay0"]

        def every_shard_applied():
            got = collect(cfg, prog, ctx, 1.0)
            ok = all(v is not None for v in got.values()) and all(got[f"ps{i}"]["updates_applied"] >= 5 for i in range(31))
            return got if ok and (run_dir / "evaluations.jsonl").exists() else None
        stats = wait_for(every_shard_applied, 240, 2.0, "every role up and every shard applying updates")
        stats = every_shard_applied() or stats
        for i in range(31):
            s = stats[f"ps{i}"]
            assert s["discarded_stale"] <= 0.05 * (s["updates_applied"] + s["discarded_stale"]) + 1, s
            assert s["rejected_total"] == 0, s
        for j in range(8):
            ln = stats[f"learner{j}"]
            assert ln["push"]["sent"] >= 1 and ln["updates"] >= 2 * ln["push"]["sent"] - 1, ln   # k = 2
        assert stats["relay0"]["snapshots"] >= 31 and all(stats["relay0"]["shards_alive"])
    except BaseException:
        for p in sorted((run_dir / "logs").glob("*.log"))[:6] + [tmp_path / "dev.log"]:
            print(f"--- {p}\n{open(p, errors='replace').read()[-2000:]}")
        raise
    finally:
        dev.terminate()
        dev.wait(90)
        ctx.destroy(linger=0)
