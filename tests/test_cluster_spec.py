"""The ssh launcher's process matching, on real processes (fast tier; the real-host tests are in
test_cluster.py)."""
import subprocess
import sys

from conftest import wait_for
from gorila_zmq.launch import cluster


def test_down_matches_the_runs_supervisors_and_roles_but_not_a_launcher_beside_them(tmp_path):
    """`cluster down` SIGKILLs what matches this pattern on every host: the launcher itself, run from
    one of them with a spec named like the run directory, must not match (it once killed itself)."""
    run_dir = tmp_path / "a.b-c" / "run"
    spec = cluster.ClusterSpec.__new__(cluster.ClusterSpec)
    spec.cfg = type("Cfg", (), {"run": type("Run", (), {"run_dir": str(run_dir)})()})()
    sleep = [sys.executable, "-c", "import time; time.sleep(60)", "gorila_zmq.cli"]
    argvs = {"role": ["ps", "--index", "0", "--config", f"{run_dir}/config.json"],
             "supervisor": ["dev", "--only-host", "10.0.0.2", f"run.run_dir={run_dir}"],
             "launcher beside": ["cluster", "down", f"{run_dir}.toml"],
             "launcher inside": ["cluster", "down", f"{run_dir}/spec.toml"],
             "another run": ["ps", "--index", "0", "--config", f"{run_dir}2/config.json"],
             "a dot in its name": ["ps", "--index", "0", "--config", f"{tmp_path}/aXb-c/run/config.json"]}
    procs = {k: subprocess.Popen(sleep + v) for k, v in argvs.items()}
    try:
        wait_for(lambda: all(open(f"/proc/{p.pid}/cmdline").read().count("gorila_zmq.cli") for p in procs.values()),
                 10, 0.05, "the processes to start")
        out = subprocess.run(["pgrep", "-f", cluster._run_pattern(spec)], capture_output=True, text=True).stdout
        matched = {k for k, p in procs.items() if str(p.pid) in out.split()}
        assert matched == {"role", "supervisor"}, matched
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_the_port_check_refuses_a_listener_but_not_the_last_runs_time_wait(tmp_path):
    """`cluster up` right after `down`: the old run's connections sit in TIME_WAIT on its ports, which
    libzmq (SO_REUSEADDR) binds again; only a port that something listens on is busy."""
    import socket
    from conftest import free_base_port
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    waiting = lst.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", waiting))
    conn, _ = lst.accept()
    conn.close()                      # the server's side closes first: TIME_WAIT on its port
    client.close()
    lst.close()
    wait_for(lambda: f":{waiting} " in subprocess.run(["ss", "-Htan", "state", "time-wait"], capture_output=True,
                                                       text=True).stdout, 10, 0.05, "TIME_WAIT on the port")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    listening = busy.getsockname()[1]
    free = free_base_port()
    try:
        out = subprocess.run([sys.executable, "-c", cluster.PORT_PROBE % ([waiting, listening, free], "127.0.0.1")],
                             capture_output=True, text=True, check=True).stdout.split("\n")
    finally:
        busy.close()
    assert out[0].split() == [str(listening)], out
