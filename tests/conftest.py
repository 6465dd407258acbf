"""Shared fixtures: free loopback ports, per-test run directories, configs, process helpers.

Every socket test binds to 127.0.0.1 on ports found free at run time; every wait is bounded.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from gorila_zmq import config as C
from gorila_zmq.net.topology import free_base_port  # noqa: F401  (tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(*overrides) -> a validated Config on free ports, in this test's directory."""
    def make(*overrides, base_port: int | None = None):
        base = [f"run.run_dir={tmp_path / 'run'}", f"net.base_port={base_port or free_base_port()}",
                "net.request_timeout_s=2.0"]
        return C.load(None, base + list(overrides))
    return make


NATURE = ["model.kind=nature_cnn"]
SMALL_MLP = ["model.kind=mlp", "model.obs_shape=[8]", "model.n_actions=4", "model.hidden=[64,64]"]


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def start_role(argv: list[str], log_path, env_extra: dict | None = None) -> subprocess.Popen:
    """Start `gorila-zmq ARGV...` as a real process with its output in log_path."""
    env = dict(os.environ)
    env.update(env_extra or {})
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "gorila_zmq.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT, start_new_session=True)


def stop_proc(p: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 10.0) -> int:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    return p.returncode


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
