"""`gorila-zmq slurm` against a real Slurm: slurmctld and one slurmd per network-namespace node
(gorila_zmq/launch/testbed.py, after ../shared/recipes/slurm-netns.md). Needs root and Debian's
slurmctld, slurmd, slurm-client and munge (.ci/run installs them); skips with the reason elsewhere.
Node n3 sees its own empty tmpfs at the testbed's private_dir: a directory there is not shared. Slow tier.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, wait_for
from gorila_zmq.launch import testbed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tb():
    why = testbed.why_not()
    if why:
        pytest.skip(why)
    with testbed.Testbed(3, private=("n3",)) as t:
        yield t


def write_spec(path, run_dir, slurm="", roles='ps = [0]\nbundles = [1, 2]\nevaluator = 1', base_port=17800):
    overrides = ["net.heartbeat_interval_s=0.5", "ps.checkpoint_interval_s=1.0", "dev.restart_backoff_s=0.5"]
    path.write_text("\n".join([
        f'run_dir = "{run_dir}"', f"base_port = {base_port}", 'preset = "cartpole"',
        f"overrides = {json.dumps(overrides)}", f'python = "{sys.executable}"', f'workdir = "{ROOT}"',
        "[slurm]", 'job_name = "gz-test"', "nodes = 3", 'time = "00:30:00"', slurm,
        "[roles]", roles]) + "\n")
    return str(path)


def cli(tb, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "slurm", *args], capture_output=True, text=True,
                          cwd=ROOT, env=tb.env, timeout=timeout)


def evaluations(run_dir):
    try:
        return [json.loads(x) for x in open(os.path.join(run_dir, "evaluations.jsonl")) if x.strip()]
    except FileNotFoundError:
        return []


def roles_stats(run_dir):
    from gorila_zmq.launch.slurm import collect_roles
    return collect_roles(run_dir, 1.0)


def job_state(tb, job_id):
    r = tb.run("scontrol", "show", "job", "-o", job_id)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def events(run_dir, kind):
    from gorila_zmq.launch.slurm import events as ev
    return [e for e in ev(run_dir) if e["event"] == kind]


def run_leftovers(run_dir):
    """Processes whose command line names this run, and /dev/shm segments of its run id, on this machine
    (every testbed node shares this machine's process table and /dev/shm)."""
    run_id = json.load(open(os.path.join(run_dir, "config.json")))["run"]["run_id"]
    return run_processes(run_dir) + [s for s in os.listdir("/dev/shm") if run_id in s]


def run_processes(run_dir):
    procs = subprocess.run(["pgrep", "-af", run_dir], capture_output=True, text=True).stdout.splitlines()
    return [p for p in procs if "pgrep" not in p]


def test_a_job_learns_loses_a_node_checkpoints_at_its_time_limit_resumes_and_cancels_clean(tb, tmp_path):
    """ps0 on n1, a bundle on each of n2 and n3, the evaluator on n2; CurveZMQ keys made at submit."""
    run_dir = str(tmp_path / "run")
    spec = write_spec(tmp_path / "spec.toml", run_dir, slurm="signal_before_s = 170")
    r = cli(tb, "submit", spec)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.split("submitted job ")[1].split(";")[0]
    assert oct(os.stat(os.path.join(run_dir, "keys", "node0.key_secret")).st_mode & 0o777) == "0o600"
    try:
        wait_for(lambda: cli(tb, "status", run_dir).returncode == 0, 120, 1.0, "every role up")
        st = cli(tb, "status", run_dir).stdout
        assert f"job {job}: RUNNING" in st, st
        lines = {ln.split()[0]: ln.split() for ln in st.splitlines()[1:]}
        assert [lines[r][1:3] for r in ("ps0", "actor0", "learner0", "actor1", "learner1", "evaluator")] == \
            [["n1", "up"], ["n2", "up"], ["n2", "up"], ["n3", "up"], ["n3", "up"], ["n2", "up"]], st
        for n in ("n1", "n2", "n3"):         # a supervisor runs no network: it never loads torch
            pid = json.load(open(os.path.join(run_dir, "slurm", f"node-{n}.json")))["pid"]
            assert "libtorch" not in open(f"/proc/{pid}/maps").read(), n
        placement = json.load(open(os.path.join(run_dir, "config.json")))["net"]["placement"]
        assert placement["ps0"] == tb.nodes["n1"] and placement["actor1"] == tb.nodes["n3"], placement
        wait_for(lambda: [e for e in evaluations(run_dir) if e["return_mean"] >= 195], 300, 1.0,
                 "CartPole solved on three Slurm nodes")
        lg = cli(tb, "logs", run_dir, "learner1")
        assert lg.returncode == 0 and "learner1" in lg.stdout, lg.stdout + lg.stderr

        # n3's supervisor SIGKILLed: Slurm reports its task killed, our status the node's roles down,
        # and the rest of the job runs on (ps0 keeps taking n2's gradients)
        pid = json.load(open(os.path.join(run_dir, "slurm", "node-n3.json")))["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: "node n3: every role is down" in cli(tb, "status", run_dir).stdout, 60, 1.0,
                 "status to say n3's roles are gone")
        st = cli(tb, "status", run_dir).stdout
        assert st.count("slurm: srun: error") >= 1 and "n3" in st and f"job {job}: RUNNING" in st, st
        v0 = roles_stats(run_dir)["ps0"]["version"]
        wait_for(lambda: roles_stats(run_dir)["ps0"]["version"] > v0 + 50, 60, 0.5, "ps0 to go on updating")
        assert roles_stats(run_dir)["actor0"] is not None

        # the time limit comes near: SIGUSR1 (signal_before_s=170) -> every role stops and checkpoints
        elapsed = job_state(tb, job)["RunTime"].split(":")
        minutes = int(elapsed[-2]) + 60 * int(elapsed[-3]) if len(elapsed) == 3 else int(elapsed[0])
        assert tb.run("scontrol", "update", f"JobId={job}", f"TimeLimit={minutes + 2}").returncode == 0
        wait_for(lambda: events(run_dir, "time_limit"), 120, 1.0, "the job to checkpoint at its time limit")
        versions = events(run_dir, "time_limit")[0]["versions"]
        assert versions[0] and versions[0] > v0, versions
        wait_for(lambda: job_state(tb, job)["JobState"] == "COMPLETED", 60, 0.5, "the job to end")
        assert run_leftovers(run_dir) == []

        # resubmitting the same spec resumes from the checkpoints, on all three nodes again
        r = cli(tb, "submit", spec)
        assert r.returncode == 0 and "resuming" in r.stdout, r.stdout + r.stderr
        job = r.stdout.split("submitted job ")[1].split(";")[0]
        wait_for(lambda: cli(tb, "status", run_dir).returncode == 0, 120, 1.0, "every role up again")
        ps0 = roles_stats(run_dir)["ps0"]
        assert ps0["resumed_from"] == "checkpoint" and ps0["version"] >= versions[0], (ps0, versions)
    finally:
        c = cli(tb, "cancel", run_dir)
        print(c.stdout, c.stderr)
    assert c.returncode == 0 and "CANCELLED" in c.stdout, c.stdout + c.stderr
    for n in ("n1", "n2", "n3"):
        assert f"{n}: nothing left" in c.stdout, c.stdout
    assert run_leftovers(run_dir) == []


@pytest.mark.parametrize("case, expect", [
    ("too_many_nodes", "asks for 4 node(s) in partition 'debug', which has 3"),
    ("unknown_partition", "unknown partition 'bigmem' (this cluster has: cpu, debug, gpu)"),
    ("no_gres", "sbatch refused the job:"),
    ("not_shared", "node n3 does not see"),
])
def test_bad_jobs_get_a_one_line_error(tb, tmp_path, case, expect):
    run_dir = str(tmp_path / "run")
    slurm = ""
    roles = 'ps = [0]\nbundles = [1, 2]'
    if case == "too_many_nodes":
        slurm, roles = "", 'ps = [0]\nbundles = [1, 2, 3]'
        spec = write_spec(tmp_path / "spec.toml", run_dir, roles=roles)
        spec_text = open(spec).read().replace("nodes = 3", "nodes = 4")
        open(spec, "w").write(spec_text)
    else:
        if case == "unknown_partition":
            slurm = 'partition = "bigmem"'
        elif case == "no_gres":
            slurm = "gpus_per_node = 1"
        elif case == "not_shared":
            run_dir = os.path.join(tb.private_dir, f"run-{os.getpid()}")
        spec = write_spec(tmp_path / "spec.toml", run_dir, slurm=slurm, roles=roles)
    r = cli(tb, "submit", spec)
    if case != "not_shared":
        assert r.returncode != 0, r.stdout
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and expect in err[0], r.stderr
        assert "Traceback" not in r.stderr
        return
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        wait_for(lambda: os.path.exists(os.path.join(run_dir, "slurm", "error")), 60, 0.5,
                 "the job's visibility check")
        st = cli(tb, "status", run_dir)
        assert st.returncode != 0 and expect in st.stdout and "every node sees" in st.stdout, st.stdout
        job = open(os.path.join(run_dir, "slurm", "job.json")).read()
        wait_for(lambda: job_state(tb, json.loads(job)["job_id"])["JobState"] not in ("RUNNING", "PENDING"),
                 30, 0.5, "the job to end")
        assert not os.path.exists(os.path.join(run_dir, "logs")) or not os.listdir(os.path.join(run_dir, "logs"))
    finally:
        cli(tb, "cancel", run_dir)
        subprocess.run(["rm", "-rf", run_dir])



HET = """signal_before_s = 170
requeue = true
[[slurm.group]]
name = "cpu"
partition = "cpu"
nodes = 1
[[slurm.group]]
name = "gpu"
partition = "gpu"
nodes = 2"""


def test_a_heterogeneous_job_places_by_group_requeues_at_its_time_limit_and_resumes(tb, tmp_path):
    """Two components (the shard on partition cpu, the bundles on partition gpu, each its own srun
    component); requeue = true: at the time limit the job checkpoints, requeues itself and resumes."""
    run_dir = str(tmp_path / "run")
    spec = write_spec(tmp_path / "spec.toml", run_dir, slurm=HET,
                      roles='ps = ["cpu:0"]\nbundles = ["gpu:0", "gpu:1"]', base_port=17900)
    spec_text = open(spec).read().replace("nodes = 3\n", "", 1)
    open(spec, "w").write(spec_text)
    r = cli(tb, "submit", spec)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.split("submitted job ")[1].split(";")[0]
    try:
        wait_for(lambda: (roles_stats(run_dir).get("ps0") or {}).get("version", 0) > 200
                 if os.path.exists(os.path.join(run_dir, "config.json")) else False, 120, 0.5, "updates")
        placement = json.load(open(os.path.join(run_dir, "config.json")))["net"]["placement"]
        assert placement == {"ps0": tb.nodes["n1"], "actor0": tb.nodes["n2"], "learner0": tb.nodes["n2"],
                             "actor1": tb.nodes["n3"], "learner1": tb.nodes["n3"]}, placement
        components = tb.run("scontrol", "show", "job", "-o", job).stdout.splitlines()
        assert [c.split("Partition=")[1].split()[0] for c in components] == ["cpu", "gpu"], components
        assert tb.run("scontrol", "update", f"JobId={job}", "TimeLimit=3").returncode == 0
        wait_for(lambda: events(run_dir, "requeueing"), 120, 1.0, "the job to checkpoint and requeue itself")
        versions = events(run_dir, "time_limit")[0]["versions"]
        # Slurm holds a requeued job for about two minutes (Reason=BeginTime): release it now, with
        # its old time limit back, so that this test need not wait
        # (once every node is idle again and the last run's processes are gone: a job started onto a
        # node still completing its last run fails, and so does a role whose port an old one holds)
        wait_for(lambda: job_state(tb, job).get("JobState") == "PENDING" and tb.idle() == 3
                 and not run_processes(run_dir), 90, 0.5, "the job to be requeued, its nodes idle, its processes gone")
        assert tb.run("scontrol", "update", f"JobId={job}", "StartTime=now", "TimeLimit=30").returncode == 0
        wait_for(lambda: int(job_state(tb, job).get("Restarts", 0)) >= 1 and cli(tb, "status", run_dir).returncode == 0,
                 120, 1.0, "the requeued job's roles up")
        assert [e["restart"] for e in events(run_dir, "started")] == [0, 1]
        ps0 = roles_stats(run_dir)["ps0"]
        assert ps0["resumed_from"] == "checkpoint" and ps0["version"] >= versions[0] > 200, (ps0, versions)
        assert "restarted 1x" in cli(tb, "status", run_dir).stdout
    finally:
        c = cli(tb, "cancel", run_dir)
        print(c.stdout, c.stderr)
        print("job output:\n" + cli(tb, "logs", run_dir, "job").stdout[-4000:])   # shown if the test failed
    assert c.returncode == 0, c.stdout + c.stderr
    assert run_leftovers(run_dir) == []
