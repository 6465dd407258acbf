"""A real multi-node Slurm on this machine, for the tests and `gorila-zmq bench launch` (root only).

Each "node" is a network namespace on a bridge with its own address and its own `slurmd`; one
`slurmctld` and a private `munged` run outside them (../shared/recipes/slurm-netns.md is the recipe
this follows). Optionally each node also runs an OpenSSH server with key-only root login, so that the
ssh launcher can drive the same nodes. The daemons are stopped by the PIDs in their pid files, never by
name. A node listed in `private` sees its own empty tmpfs at `Testbed.private_dir` (every other node
sees the host's directory there): a run directory under it is not on a shared filesystem.

    with Testbed(3) as tb:            # nodes n1..n3 at 10.88.0.2..4; partitions debug (all), cpu (n1), gpu (n2, n3)
        subprocess.run(["sbatch", ...], env=tb.env)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

SUBNET = "10.88.0"
NEEDED = ("ip", "nsenter", "unshare", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged")


def _sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"testbed: `{cmd}` failed: {r.stderr.strip()[-400:]}")
    return r


def why_not(ssh: bool = False) -> str | None:
    """None when a testbed can be built here, else the reason (for a test's skip)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd)"
    for tool in NEEDED + (("/usr/sbin/sshd", "ssh", "ssh-keygen") if ssh else ()):
        if not shutil.which(tool) and not shutil.which(tool, path="/usr/sbin:/sbin"):
            return (f"{tool} is not installed (apt-get install slurmctld slurmd slurm-client munge"
                    + (" openssh-server" if ssh else "") + ")")
    if not os.path.exists("/etc/munge/munge.key"):
        return "no /etc/munge/munge.key (the munge package makes it)"
    return None


def _sbin(tool: str) -> str:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin") or tool


class Testbed:
    def __init__(self, nodes: int = 3, cpus: int = 2, private: tuple[str, ...] = (), ssh: bool = False,
                 tag: str | None = None):
        self.tag = tag or f"gs{os.getpid() % 10000}"
        self.n = nodes
        self.nodes = {f"n{i + 1}": f"{SUBNET}.{i + 2}" for i in range(nodes)}
        self.cpus, self.private, self.ssh = cpus, tuple(private), ssh
        self.dir = f"/run/{self.tag}-slurm"          # munged must reach it: not under a 0700 tmp dir
        self.private_dir = os.path.join(self.dir, "local")
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.ssh_options: list[str] = []
        self._ns: list[str] = []

    # -- pieces -------------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        d = self.dir
        host = socket.gethostname()
        lines = [
            "ClusterName=gztest", f"SlurmctldHost={host}({SUBNET}.1)", "SlurmUser=root", "AuthType=auth/munge",
            f"AuthInfo=socket={d}/munge/munge.sock", f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none", "ReturnToService=2",
            "SchedulerType=sched/backfill", "SchedulerParameters=bf_interval=1", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SrunPortRange=30001-30999", "KillWait=30",
            "MinJobAge=600", "SlurmctldTimeout=10", "SlurmdTimeout=30", "InactiveLimit=0",
        ]
        lines += [f"NodeName={n} NodeAddr={a} CPUs={self.cpus} RealMemory=4000" for n, a in self.nodes.items()]
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        names = list(self.nodes)
        if len(names) > 1:          # for heterogeneous jobs: the first node, and the rest
            lines.append(f"PartitionName=cpu Nodes={names[0]} MaxTime=INFINITE State=UP")
            lines.append(f"PartitionName=gpu Nodes={','.join(names[1:])} MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _netns(self) -> None:
        br = f"{self.tag}br"
        _sh(f"ip link add {br} type bridge && ip addr add {SUBNET}.1/24 dev {br} && ip link set {br} up")
        for name, addr in self.nodes.items():
            ns, veth = f"{self.tag}{name}", f"{self.tag}{name}v"
            _sh(f"ip netns add {ns} && ip link add {veth} type veth peer name {veth}p && ip link set {veth}p netns {ns}"
                f" && ip link set {veth} master {br} up && ip netns exec {ns} ip addr add {addr}/24 dev {veth}p"
                f" && ip netns exec {ns} ip link set {veth}p up && ip netns exec {ns} ip link set lo up")
            self._ns.append(ns)

    def _munge(self) -> None:
        m = os.path.join(self.dir, "munge")
        os.makedirs(m, exist_ok=True)
        shutil.copy("/etc/munge/munge.key", f"{m}/munge.key")
        _sh(f"chown -R munge:munge {m} && chmod 0755 {m} && chmod 0600 {m}/munge.key")
        _sh(f"runuser -u munge -- {_sbin('munged')} --socket={m}/munge.sock --pid-file={m}/munged.pid "
            f"--key-file={m}/munge.key --seed-file={m}/munge.seed --log-file={m}/munged.log")

    def _sshd(self) -> None:
        d = self.dir
        _sh(f"ssh-keygen -q -t ed25519 -N '' -f {d}/id && ssh-keygen -q -t ed25519 -N '' -f {d}/hostkey "
            f"&& cp {d}/id.pub {d}/authorized_keys && mkdir -p /run/sshd")
        for name, addr in self.nodes.items():
            with open(f"{d}/sshd_{name}", "w") as f:
                f.write(f"ListenAddress {addr}\nPort 22\nHostKey {d}/hostkey\nPidFile {d}/sshd_{name}.pid\n"
                        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                        f"KbdInteractiveAuthentication no\nAuthorizedKeysFile {d}/authorized_keys\nStrictModes no\n"
                        f"UsePAM no\nSetEnv PATH={os.environ['PATH']} SLURM_CONF={self.conf}\n")
            _sh(f"nsenter --net=/run/netns/{self.tag}{name} /usr/sbin/sshd -f {d}/sshd_{name}")
        self.ssh_options = ["-i", f"{d}/id", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "-o", "LogLevel=ERROR"]

    def _slurm(self) -> None:
        d = self.dir
        for sub in ["state", *(f"spool/{n}" for n in self.nodes)]:
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        os.makedirs(self.private_dir, exist_ok=True)
        subprocess.run([_sbin("slurmctld"), "-i"], env=self.env, check=True, capture_output=True)
        for name in self.nodes:
            slurmd = f"{_sbin('slurmd')} -N {name}"
            if name in self.private:      # its own mount namespace: a tmpfs over private_dir
                slurmd = (f"unshare --mount --propagation private sh -c "
                          f"'mount -t tmpfs gz-local {self.private_dir} && exec {slurmd}'")
            subprocess.run(f"nsenter --net=/run/netns/{self.tag}{name} {slurmd}", shell=True, env=self.env,
                           check=True, capture_output=True)
        self.wait(lambda: self.idle() == self.n, 60, "every slurmd to register")

    # -- use ----------------------------------------------------------------------------------------
    def idle(self) -> int:
        """How many nodes are idle in every partition that holds them (a node still completing its last
        job, or drained, is not: sinfo prints a node once per partition, so count names, not lines)."""
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        states: dict[str, set[str]] = {}
        for line in r.stdout.splitlines():
            name, _, state = line.partition(" ")
            states.setdefault(name, set()).add(state.strip())
        return sum(1 for s in states.values() if s == {"idle"})

    @staticmethod
    def wait(pred, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            time.sleep(0.2)
        raise TimeoutError(f"testbed: timed out after {timeout:.0f}s waiting for {what}")

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        """A Slurm command (sbatch, squeue, scontrol ...) against this cluster."""
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, **kw)

    def netns(self, node: str) -> str:
        return f"/run/netns/{self.tag}{node}"

    def __enter__(self) -> "Testbed":
        clear_leftovers()
        os.makedirs(self.dir, exist_ok=True)
        try:
            self._write_conf()
            self._netns()
            self._munge()
            if self.ssh:
                self._sshd()
            self._slurm()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        d = self.dir
        pidfiles = [f"{d}/slurmd-{n}.pid" for n in self.nodes] + [f"{d}/slurmctld.pid", f"{d}/munge/munged.pid"]
        pidfiles += [f"{d}/sshd_{n}.pid" for n in self.nodes]
        for path in pidfiles:
            _kill_pidfile(path)
        for ns in self._ns:
            _sh(f"ip netns pids {ns} | xargs -r kill -9", check=False)
            _sh(f"ip netns del {ns}", check=False)
        _sh(f"ip link del {self.tag}br", check=False)
        shutil.rmtree(d, ignore_errors=True)


def _kill_pidfile(path: str, timeout: float = 10.0) -> None:
    try:
        pid = int(open(path).read().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def clear_leftovers() -> None:
    """The daemons, namespaces and bridge of an earlier testbed that was killed before its teardown:
    they hold 10.88.0.0/24 and the Slurm ports, which two testbeds cannot share anyway."""
    for d in [p for p in os.listdir("/run") if re.fullmatch(r"gs\d+-slurm", p)]:
        d = os.path.join("/run", d)
        for f in sorted(os.listdir(d)):
            if f.endswith(".pid"):
                _kill_pidfile(os.path.join(d, f))
        _kill_pidfile(os.path.join(d, "munge", "munged.pid"))
        shutil.rmtree(d, ignore_errors=True)
    for ns in re.findall(r"^(gs\d+n\d+)\b", _sh("ip netns list", check=False).stdout, re.M):
        _sh(f"ip netns pids {ns} | xargs -r kill -9; ip netns del {ns}", check=False)
    for br in re.findall(r"^\d+: (gs\d+br)[:@]", _sh("ip -o link show type bridge", check=False).stdout, re.M):
        _sh(f"ip link del {br}", check=False)
