"""Hosts made on this machine for benchmarks: network namespaces on one bridge, each link shaped by a
token bucket (`tc qdisc ... tbf`) in both directions. Needs root and iproute2. The kernel's netem (delay)
is used when it is there; where it is not (some VM kernels ship without sch_netem), links get a rate
and no added delay, and `delay_applied` says so."""
from __future__ import annotations

import os
import re
import subprocess


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr.strip()}")
    return r


def why_not() -> str | None:
    """None where namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    r = sh("ip netns add gzprobe && ip netns del gzprobe", check=False)
    if r.returncode != 0:
        return f"cannot create network namespaces: {r.stderr.strip()}"
    return None


class Hosts:
    """`names` -> addresses 10.<net>.0.2, .3, ...; `exec_prefix(name)` runs a command on that host."""

    def __init__(self, names: list[str], rate: str | None = "1gbit", delay_ms: float = 0.0, net: int = 79,
                 tag: str | None = None):
        self.tag = tag or f"gzb{os.getpid() % 10000}"
        self.names, self.rate, self.delay_ms, self.net = list(names), rate, delay_ms, net
        self.addr = {n: f"10.{net}.0.{i + 2}" for i, n in enumerate(self.names)}
        self.delay_applied = False

    def ns(self, name: str) -> str:
        return f"{self.tag}{name}"

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)]

    def __enter__(self) -> "Hosts":
        why = why_not()
        if why:
            raise RuntimeError(why)
        self._clear()
        br = f"{self.tag}br"
        sh(f"ip link add {br} type bridge && ip addr add 10.{self.net}.0.1/24 dev {br} && ip link set {br} up")
        for k, name in enumerate(self.names):
            ns, veth = self.ns(name), f"{self.tag}v{k}"
            sh(f"ip netns add {ns} && ip link add {veth} type veth peer name {veth}p && ip link set {veth}p netns {ns} "
               f"&& ip link set {veth} master {br} up && ip netns exec {ns} ip addr add {self.addr[name]}/24 dev {veth}p "
               f"&& ip netns exec {ns} ip link set {veth}p up && ip netns exec {ns} ip link set lo up")
            if self.rate:
                self._shape(veth, "")                              # toward the host
                self._shape(f"{veth}p", f"ip netns exec {ns} ")    # from the host
        return self

    def _shape(self, dev: str, prefix: str) -> None:
        bits = _bits(self.rate)
        burst = max(256 * 1024, int(bits / 8 / 250))              # >= one jiffy of the rate (HZ 250)
        tbf = f"tbf rate {self.rate} burst {burst} latency 20ms"
        if self.delay_ms > 0:
            r = sh(f"{prefix}tc qdisc add dev {dev} root handle 1: netem delay {self.delay_ms}ms", check=False)
            if r.returncode == 0:
                self.delay_applied = True
                sh(f"{prefix}tc qdisc add dev {dev} parent 1: handle 2: {tbf}")
                return
        sh(f"{prefix}tc qdisc add dev {dev} root {tbf}")

    def _clear(self) -> None:
        for ns in re.findall(rf"^({self.tag}\w+)", sh("ip netns list", check=False).stdout, re.M):
            sh(f"ip netns pids {ns} | xargs -r kill -9; ip netns del {ns}", check=False)
        sh(f"ip link del {self.tag}br", check=False)

    def __exit__(self, *exc) -> None:
        self._clear()


def _bits(rate: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: use e.g. 1gbit, 10gbit")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
