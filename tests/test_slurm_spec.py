"""The Slurm launcher's spec, batch script and placement, without a Slurm (fast tier). The real-Slurm
tests are in test_slurm.py."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from gorila_zmq import config as C
from gorila_zmq.launch import slurm

HET = """run_dir = "{run}"
preset = "cartpole"
curve = false
[slurm]
time = "02:00:00"
requeue = true
signal_before_s = 300
sbatch = ["--account=rl"]
[[slurm.group]]
name = "cpu"
partition = "cpu"
nodes = 1
[[slurm.group]]
name = "gpu"
partition = "gpu"
nodes = 2
gpus_per_node = 1
[roles]
ps = ["cpu:0"]
bundles = ["gpu:0", "gpu:1"]
evaluator = "cpu:0"
"""


def write(tmp_path, text):
    p = tmp_path / "spec.toml"
    p.write_text(text.format(run=tmp_path / "run"))
    return str(p)


def test_a_heterogeneous_spec_makes_one_component_per_group_and_places_roles_by_node(tmp_path):
    spec = slurm.load_spec(write(tmp_path, HET))
    script = slurm.batch_script(spec)
    assert script.count("#SBATCH hetjob") == 1
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-node=1" in script and "#SBATCH --signal=B:USR1@300" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --account=rl" in script
    assert script.index("--partition=cpu") < script.index("hetjob") < script.index("--partition=gpu")
    record = {"groups": [g.__dict__ for g in spec.groups], "refs": spec.refs}
    nodes = [[("c1", "10.0.0.1")], [("g1", "10.0.0.2"), ("g2", "10.0.0.3")]]
    where = slurm.placement(record, nodes)
    assert where == {"ps0": "10.0.0.1", "evaluator": "10.0.0.1", "actor0": "10.0.0.2", "learner0": "10.0.0.2",
                     "actor1": "10.0.0.3", "learner1": "10.0.0.3"}
    argv = slurm._srun(record, ["x"])
    assert argv.count(":") == 1 and "--het-group=1" in argv


@pytest.mark.parametrize("change, expect", [
    (('ps = ["cpu:0"]', 'ps = ["cpu:1"]'), "group cpu has 1 node"),
    (('ps = ["cpu:0"]', 'ps = [7]'), "the job has 3 node(s)"),
    (('bundles = ["gpu:0", "gpu:1"]', 'bundles = ["gpu:0", "gpu:0"]'), "gpu:1 would run no role"),
    (('time = "02:00:00"', 'tyme = "1"'), "unknown key(s) ['tyme']"),
    (('time = "02:00:00"', 'nodes = 3'), "each group gives its own nodes"),
])
def test_spec_errors_are_one_line(tmp_path, change, expect):
    with pytest.raises(C.ConfigError, match=None) as e:
        slurm.load_spec(write(tmp_path, HET.replace(*change)))
    assert expect in str(e.value)


def test_submit_without_slurm_says_so(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    r = subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "slurm", "submit", write(tmp_path, HET)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode != 0 and "Slurm is not installed here" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
