"""The role frame: control requests are answered while a step is still running, a failing stats()
is an error reply (not a dead control thread), and scalars reach the CSV."""
import threading
import time

import pytest

from conftest import wait_for

from gorila_zmq.net import protocol as P
from gorila_zmq.net import topology
from gorila_zmq.net.rpc import request
from gorila_zmq.roles.base import Role


class Slow(Role):
    name = "slow"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx, topology.control(cfg, "learner", 0))
        self.steps = 0
        self.fail = False

    def step(self):
        time.sleep(1.5)                 # one long unit of work (a DrQ-v2 update on a CPU)
        self.steps += 1

    def stats(self):
        if self.fail:
            raise RuntimeError("counter being rebuilt")
        return {"steps": self.steps}


def _answers(ctx, ep) -> bool:
    try:
        request(ctx, ep, P.Header(P.Cmd.STATS), timeout_s=0.5, retries=0)
        return True
    except Exception:
        return False


def test_status_is_answered_during_a_long_step(make_cfg, ctx):
    cfg = make_cfg("dev.stats_interval_s=0.5")
    role = Slow(cfg, ctx)
    t = threading.Thread(target=role.run, kwargs={"duration": 6.0}, daemon=True)
    t.start()
    try:
        ep = topology.control(cfg, "learner", 0).connect
        wait_for(lambda: _answers(ctx, ep), 10, what="the control socket to serve")
        for _ in range(3):              # each within 0.5 s although every step takes 1.5 s
            hdr, body = request(ctx, ep, P.Header(P.Cmd.STATS), timeout_s=0.5, retries=0)
            assert P.as_json(hdr, body)["role"] == "slow"
            time.sleep(0.4)
        role.fail = True
        with pytest.raises(P.ProtocolError, match="stats unavailable"):
            request(ctx, ep, P.Header(P.Cmd.STATS), timeout_s=0.5, retries=0)
        role.fail = False
        hdr, body = request(ctx, ep, P.Header(P.Cmd.STATS), timeout_s=0.5, retries=0)
        assert "steps" in P.as_json(hdr, body)   # the control thread survived the failing stats()
    finally:
        role.request_stop()
        t.join(10)
    assert not t.is_alive()
    rows = open(role.scalars.path).read().splitlines()
    assert rows[0] == "wall_time,step,name,value" and any(",steps," in r for r in rows[1:])


def test_learner_torch_threads_apply_to_learners_only(make_cfg):
    from gorila_zmq.config import ConfigError
    from gorila_zmq.roles.base import torch_threads
    cfg = make_cfg("agent.torch_threads=1", "agent.learner_torch_threads=2")
    assert torch_threads(cfg, "learner") == 2
    assert [torch_threads(cfg, r) for r in ("actor", "evaluator", "replay")] == [1, 1, 1]
    assert torch_threads(make_cfg("agent.torch_threads=3"), "learner") == 3      # 0: the common setting
    with pytest.raises(ConfigError, match="learner_torch_threads"):
        make_cfg("agent.learner_torch_threads=-1")


def test_a_port_in_the_ephemeral_range_is_warned_about(tmp_path):
    """Outgoing connections take local ports from the kernel's ephemeral range; a role listening there
    fails at random with 'Address already in use' (seen in a sweep harness). dev and cluster up warn."""
    from gorila_zmq import config as C
    from gorila_zmq.launch.program import make_program
    f = tmp_path / "range"
    f.write_text("32768\t60999\n")
    assert topology.ephemeral_range(str(f)) == (32768, 60999)
    assert topology.ephemeral_range(str(tmp_path / "absent")) is None
    rng = (32768, 60999)
    low = C.load(None, [f"run.run_dir={tmp_path}/a"], preset="cartpole")
    prog = make_program(low, "x.json", layout_hash=0)
    ports = topology.tcp_ports(low, prog)
    b = low.net.base_port
    # ps0 request + broadcast, and the control sockets of actor0, learner0 and the evaluator
    assert ports == [b, b + 1, b + topology.ACTOR_CTL, b + topology.LEARNER_CTL, b + topology.EVAL_CTL]
    assert topology.ephemeral_warning(low, prog, rng) is None
    high = C.load(None, [f"run.run_dir={tmp_path}/b", "net.base_port=30000"], preset="cartpole")
    w = topology.ephemeral_warning(high, make_program(high, "x.json", layout_hash=0), rng)
    assert w and "33000, 34000 lie" in w and "32000" not in w   # learner0 and evaluator; actor0 at 32000 is below
    assert f"net.base_port <= {32767 - topology.EVAL_CTL}" in w
    ipc = C.load(None, [f"run.run_dir={tmp_path}/c", "net.base_port=30000", "net.transport=ipc"], preset="cartpole")
    assert topology.ephemeral_warning(ipc, make_program(ipc, "x.json", layout_hash=0), rng) is None
    # a range that starts low leaves room only above it, or none
    w = topology.ephemeral_warning(low, prog, (1024, 60999))
    assert w and "net.base_port >= 61000" in w and "<=" not in w
    w = topology.ephemeral_warning(low, prog, (1024, 65535))
    assert w and "Reserve the run's ports" in w and ">=" not in w
