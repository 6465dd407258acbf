"""Cluster mode on real hosts made on this machine: network namespaces on a bridge, each running a real
OpenSSH server with key-only root login; the launcher drives them over ssh. Needs root, iproute2 and
openssh-server (.ci/run installs them); skips with the reason where they are missing. Slow tier."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, wait_for

pytestmark = pytest.mark.slow

TAG = f"gz{os.getpid() % 10000}"
HOSTS = {"alpha": "10.77.0.2", "beta": "10.77.0.3", "gamma": "10.77.0.5", "stranger": "10.77.0.4"}
LINK = "1gbit"                      # every host's link, both ways (tc tbf): a rack's network, not loopback


def shape(dev: str, prefix: str = "") -> None:
    """A token bucket at LINK on `dev`; netem delay (0.2 ms) where this kernel has it."""
    tbf = f"tbf rate {LINK} burst 512kb latency 20ms"
    if sh(f"{prefix}tc qdisc add dev {dev} root handle 1: netem delay 0.2ms", check=False).returncode == 0:
        sh(f"{prefix}tc qdisc add dev {dev} parent 1: handle 2: {tbf}")
    else:
        sh(f"{prefix}tc qdisc add dev {dev} root {tbf}")


def sh(cmd, check=True, **kw):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True, **kw)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd)"
    for tool in ("ip", "ssh", "ssh-keygen", "/usr/sbin/sshd"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install iproute2 openssh-server openssh-client)"
    r = sh(f"ip netns add {TAG}probe && ip netns del {TAG}probe", check=False)
    if r.returncode != 0:
        return f"cannot create network namespaces here: {r.stderr.strip()}"
    return None


def _clear_leftovers():
    """Namespaces, sshds and the bridge of an earlier session that was killed before its teardown: they
    hold 10.77.0.0/24, which two sessions cannot share anyway."""
    import re
    for ns in re.findall(r"^(gz\d+(?:%s))\b" % "|".join(HOSTS), sh("ip netns list", check=False).stdout, re.M):
        sh(f"ip netns pids {ns} | xargs -r kill -9; ip netns del {ns}", check=False)
    for br in re.findall(r"^\d+: (gz\d+br)[:@]", sh("ip -o link show type bridge", check=False).stdout, re.M):
        sh(f"ip link del {br}", check=False)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    why = _why_not()
    if why:
        pytest.skip(why)
    _clear_leftovers()
    d = tmp_path_factory.mktemp("hosts")
    br = f"{TAG}br"
    sh(f"ssh-keygen -q -t ed25519 -N '' -f {d}/id && ssh-keygen -q -t ed25519 -N '' -f {d}/wrong_id")
    sh(f"ssh-keygen -q -t ed25519 -N '' -f {d}/hostkey && cp {d}/id.pub {d}/authorized_keys && mkdir -p /run/sshd")
    sh(f"ip link add {br} type bridge && ip addr add 10.77.0.1/24 dev {br} && ip link set {br} up")
    for name, addr in HOSTS.items():
        ns, veth = f"{TAG}{name}", f"{TAG}{name[:3]}"
        sh(f"ip netns add {ns} && ip link add {veth} type veth peer name {veth}p && ip link set {veth}p netns {ns} "
           f"&& ip link set {veth} master {br} up && ip netns exec {ns} ip addr add {addr}/24 dev {veth}p "
           f"&& ip netns exec {ns} ip link set {veth}p up && ip netns exec {ns} ip link set lo up")
        if shutil.which("tc"):
            shape(veth)                                     # toward the host
            shape(f"{veth}p", f"ip netns exec {ns} ")       # from the host
        (d / f"sshd_{name}").write_text(
            f"ListenAddress {addr}\nPort 22\nHostKey {d}/hostkey\nPidFile {d}/sshd_{name}.pid\n"
            f"PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nSetEnv PATH={os.environ['PATH']}\n")
        sh(f"ip netns exec {ns} /usr/sbin/sshd -f {d}/sshd_{name}")
    opts = ["-i", f"{d}/id", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR"]
    info = {"dir": d, "opts": opts, "wrong_opts": ["-i", f"{d}/wrong_id"] + opts[2:]}
    try:
        for addr in HOSTS.values():
            wait_for(lambda: sh(f"ssh -o BatchMode=yes -o ConnectTimeout=2 {' '.join(opts)} root@{addr} true",
                                check=False).returncode == 0, 30, 0.5, f"sshd on {addr}")
        yield info
    finally:
        for name in HOSTS:
            ns = f"{TAG}{name}"
            sh(f"ip netns pids {ns} | xargs -r kill -9", check=False)
            sh(f"ip netns del {ns}", check=False)
        sh(f"ip link del {br}", check=False)


def write_spec(path, info, run_dir, keys, **over):
    hosts = over.pop("hosts", {"alpha": HOSTS["alpha"], "beta": HOSTS["beta"]})
    python = over.pop("python", sys.executable)
    roles = over.pop("roles", 'ps = ["alpha", "alpha"]\nbundles = ["beta", "beta"]\nevaluator = "beta"')
    opts = over.pop("opts", info["opts"])
    overrides = ["net.heartbeat_interval_s=0.5", "ps.checkpoint_interval_s=1.0", "dev.restart_backoff_s=0.5",
                 *over.pop("extra", [])]
    lines = [f'run_dir = "{run_dir}"', f'keys_dir = "{keys}"', "curve = true",
             f"base_port = {over.pop('base_port', 17500)}", 'preset = "cartpole"',
             f"overrides = {json.dumps(overrides)}"]
    for name, addr in hosts.items():
        lines += ["[[host]]", f'name = "{name}"', f'address = "{addr}"', 'user = "root"',
                  f'python = "{python}"', f'workdir = "{ROOT}"', f"ssh_options = {json.dumps(opts)}"]
    lines += ["[roles]", roles]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def cluster(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gorila_zmq.cli", "cluster", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def keys(hosts):
    from gorila_zmq.net import security
    k = str(hosts["dir"] / "keys")
    security.gen_keys(k, ["alpha", "beta", "gamma", "launcher"])
    security.gen_keys(str(hosts["dir"] / "stranger_keys"), ["stranger"])
    return k


def test_cluster_up_learns_survives_a_cut_link_and_down_leaves_nothing(hosts, keys, tmp_path):
    """Three hosts on shaped 1 Gb/s links (shards on two, both bundles on the third with its relay),
    bfloat16 gradients: a 5 s link cut while it learns costs no update twice, both shards SIGKILLed come
    back with their live shared memory, and the run goes on to solve CartPole."""
    from gorila_zmq.launch.cluster import _collect, leftovers, load_spec
    assert "tbf" in sh(f"tc qdisc show dev {TAG}bet").stdout            # the links really are shaped
    run_dir = str(tmp_path / "run")
    spec_path = write_spec(tmp_path / "spec.toml", hosts, run_dir, keys,
                           hosts={h: HOSTS[h] for h in ("alpha", "beta", "gamma")},
                           roles='ps = ["alpha", "gamma"]\nbundles = ["beta", "beta"]\nevaluator = "beta"',
                           extra=["net.grad_dtype=bfloat16", "net.param_relay=true"])
    spec = load_spec(spec_path)
    try:
        r = cluster("up", spec_path)                # inside the try: `down` runs whatever happens
        assert r.returncode == 0, r.stdout + r.stderr
        assert "first gradient applied" in r.stdout, r.stdout
        print(r.stdout)
        assert "already running" in cluster("up", spec_path).stdout        # idempotent
        st = cluster("status", spec_path)
        assert st.returncode == 0 and "DOWN" not in st.stdout, st.stdout
        for role in ("ps0", "ps1", "actor0", "actor1", "learner0", "learner1", "evaluator", "relay0"):
            assert role in st.stdout
        # an unauthorised client from another namespace gets nothing, and is counted
        probe = (
            "import sys, zmq\n"
            "from gorila_zmq.net import security, protocol as P\n"
            "from gorila_zmq.net.rpc import request, Unavailable\n"
            f"s = security.load({str(hosts['dir'] / 'stranger_keys')!r}, 'stranger')\n"
            f"real = security.load({keys!r}, 'launcher')\n"
            "c = security.Curve(real.server_public, None, s.client_public, s.client_secret, s.authorized_dir)\n"
            "ctx = zmq.Context()\n"
            "for who in (c, None):\n"
            "    with security.use(who):\n"
            "        try:\n"
            f"            request(ctx, {spec_endpoint(spec)!r}, P.Header(P.Cmd.GET_PARAMS, shard=0), timeout_s=1.0, retries=1)\n"
            "            sys.exit('got an answer')\n"
            "        except Unavailable:\n"
            "            pass\n"
            "        sub = P.make_socket(ctx, zmq.SUB)\n"
            "        sub.setsockopt(zmq.SUBSCRIBE, b'')\n"
            f"        sub.connect({spec_pub(spec)!r})\n"
            "        if sub.poll(3000):\n"
            "            sys.exit('the publisher sent parameters to a stranger')\n"
            "        sub.close(linger=0)\n"
            "print('refused')\n")
        before = _collect(spec, "launcher")["ps0"]["auth_failures"]
        out = subprocess.run(["ip", "netns", "exec", f"{TAG}stranger", sys.executable, "-c", probe],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0 and "refused" in out.stdout, out.stdout + out.stderr
        assert _collect(spec, "launcher")["ps0"]["auth_failures"] > before
        # While it learns: cut beta's link for a few heartbeats, then restore it; the run carries on
        wait_for(lambda: evaluations(run_dir), 120, 1.0, "a first evaluation")
        sh(f"ip link set {TAG}bet down")
        time.sleep(5)
        sh(f"ip link set {TAG}bet up")
        cut_over = time.time()
        wait_for(lambda: [e for e in evaluations(run_dir) if e["wall_time"] > cut_over + 5], 120, 1.0,
                 "evaluations after the link came back")
        stats = _collect(spec, "launcher")
        assert all(v is not None for v in stats.values()), stats
        # Pushes cut off by the link were retried with the same (client, seq) and no learner gave one
        # up (that each is applied at most once is shown in test_ps_mp, where the acks can be counted
        # at rest: here the run is live).
        for j in range(2):
            push = stats[f"learner{j}"]["push"]
            assert push["lost"] == 0 and push["applied"] > 0, push
        logs = cluster("logs", spec_path, "learner0")
        assert logs.returncode == 0 and "learner0" in logs.stdout
        # one host's shards killed with SIGKILL: they come back with their live shared memory
        for role in ("ps0", "ps1"):
            assert cluster("restart", spec_path, role).returncode == 0
        killed = time.time()
        wait_for(lambda: all((_collect(spec, "launcher").get(f"ps{i}") or {}).get("resumed_from") == "segment"
                             for i in range(2)), 60, 0.5, "the shards to come back with their live shared memory")
        # and the run, disturbed twice, still learns: solved after both
        wait_for(lambda: [e for e in solved(run_dir) if e["wall_time"] > killed + 5], 240, 1.0,
                 "CartPole solved across the cluster after the cut and the shards' restart")
    finally:
        r = cluster("down", spec_path)
        print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    assert not any(leftovers(load_spec(spec_path)).values())


def test_bootstrap_installs_a_locally_built_wheel_over_ssh(hosts, keys, tmp_path):
    venv = tmp_path / "venv"                  # a host's fresh environment (no shared install)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-c", "import ensurepip; ensurepip.bootstrap()"], check=True,
                   capture_output=True)
    spec = write_spec(tmp_path / "spec.toml", hosts, str(tmp_path / "run"), keys, python=str(venv / "bin" / "python"),
                      hosts={"alpha": HOSTS["alpha"]}, roles='ps = ["alpha"]\nbundles = ["alpha"]')
    r = cluster("bootstrap", spec, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "alpha: installed gorila_zmq-" in r.stdout
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "show", "-f", "gorila-zmq"], capture_output=True,
                         text=True)
    assert "gorila_zmq/_ext/optim" in out.stdout and "site-packages" in out.stdout   # the compiled kernels too


def spec_pub(spec):
    from gorila_zmq.net import topology
    return topology.ps_broadcast(spec.cfg, 0).connect


def spec_endpoint(spec):
    from gorila_zmq.net import topology
    return topology.ps_request(spec.cfg, 0).connect


def evaluations(run_dir):
    try:
        return [json.loads(line) for line in open(os.path.join(run_dir, "evaluations.jsonl")) if line.strip()]
    except FileNotFoundError:
        return []


def solved(run_dir):
    return [e for e in evaluations(run_dir) if e["return_mean"] >= 195]


@pytest.mark.parametrize("case, expect", [
    ("unreachable", "unreachable"),
    ("bad_login", "ssh login failed"),
    ("no_python", "no Python with gorila-zmq"),
    ("unknown_host", "unknown host 'gamma'"),
    ("unknown_role", "unknown role kinds"),
    ("port_in_use", "already in use"),
    ("port_in_use_ephemeral", "ephemeral port range ("),
])
def test_clear_errors(hosts, keys, tmp_path, case, expect):
    kw = {}
    blocker = None
    if case == "unreachable":
        kw["hosts"] = {"alpha": "10.77.0.99", "beta": HOSTS["beta"]}
    elif case == "bad_login":
        kw["opts"] = hosts["wrong_opts"]
    elif case == "no_python":
        kw["python"] = "/nonexistent/bin/python"
    elif case == "unknown_host":
        kw["roles"] = 'ps = ["gamma"]\nbundles = ["beta"]'
    elif case == "unknown_role":
        kw["roles"] = 'ps = ["alpha"]\nbundles = ["beta"]\nshards = ["alpha"]'
    elif case.startswith("port_in_use"):
        # _ephemeral: alpha's shard ports lie in the kernel's ephemeral range, which `up` warns about
        # before it refuses the port that is taken.
        port = 40000 if case.endswith("ephemeral") else 18500
        kw["base_port"] = port
        blocker = subprocess.Popen(["ip", "netns", "exec", f"{TAG}alpha", sys.executable, "-c",
                                    f"import socket,time; s=socket.socket(); s.bind(('10.77.0.2', {port})); "
                                    "s.listen(); time.sleep(60)"])
        wait_for(lambda: f":{port} " in subprocess.run(["ip", "netns", "exec", f"{TAG}alpha", "ss", "-Hltn"],
                                                       capture_output=True, text=True).stdout, 10, 0.1,
                 "the blocker to listen")
    try:
        spec = write_spec(tmp_path / "spec.toml", hosts, str(tmp_path / "run"), keys, **kw)
        r = cluster("up", spec, "--timeout", "20", timeout=120)
        assert r.returncode != 0
        assert expect in r.stderr, r.stderr
        assert ("ephemeral" in r.stderr) == case.endswith("ephemeral"), r.stderr
        if case.startswith("port_in_use"):
            assert "already in use" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        if blocker:
            blocker.kill()
        cluster("down", spec, timeout=120)
