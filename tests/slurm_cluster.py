"""A real two-node SLURM cluster on one machine, for the end-to-end launch tests.

`SlurmCluster` starts Debian's `munged`, `slurmctld` and one `slurmd` per emulated node. Each
node is a network namespace (its own address on a private bridge, reached through a veth
pair whose inner end is called `s3eth0` in every namespace) and a UTS namespace (its own host
name), so `hostname`, name resolution and the gloo rendezvous behave as on two machines:

    root namespace:  munged, slurmctld @ BRIDGE (10.250.X.1), the test's sbatch/scontrol
    node 1:          slurmd -N s3xNa @ 10.250.X.11   (netns s3xNa, hostname s3xNa)
    node 2:          slurmd -N s3xNb @ 10.250.X.12   (netns s3xNb, hostname s3xNb)

What was learnt setting SLURM up on one host shapes the details: slurmd is entered into its
namespace with `nsenter --net=` (`ip netns exec` remounts /sys and slurmd then finds no
cgroup filesystem); slurmctld must run under this host's own name; the node names go into
/etc/hosts. Every name, address and port carries a per-cluster number X so that two test
sessions on one machine do not collide, and everything lives under one temporary directory
(config, munge key and socket, state, spool, logs).

`stop()` undoes all of it in reverse order and never raises: jobs cancelled, every process
left in the node namespaces and the daemons ended by their own pid, namespaces, veths and the
bridge deleted, this cluster's /etc/hosts lines removed. Only addresses on the private bridge
this class creates are ever used.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_PACKAGES = ("slurm-wlm", "munge", "iproute2")
NODE_IFNAME = "s3eth0"  # the same inside every node namespace, so one GLOO_SOCKET_IFNAME fits all
HOSTS_FILE = Path("/etc/hosts")
_SUBNET = "10.250"


class ClusterError(RuntimeError):
    """The cluster could not be built; the message holds the failing command and daemon logs."""


def _run(cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise ClusterError(f"command {cmd} failed with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def namespaces_forbidden_reason() -> str | None:
    """None when this host lets us create network namespaces; otherwise why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "the SLURM cluster tests need root (network namespaces, /etc/hosts, slurmd)"
    if shutil.which("ip") is None and shutil.which("apt-get") is None:
        return "neither iproute2 nor apt-get is available to create network namespaces"
    if shutil.which("ip") is None:
        return None  # iproute2 comes with the install; probe again after it
    name = f"s3probe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"this host forbids network namespaces (`ip netns add` failed: {proc.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def ensure_slurm_installed() -> float:
    """apt-get install Debian's SLURM and munge when missing. Returns the seconds it took."""
    needed = ("slurmctld", "slurmd", "sbatch", "munged", "ip", "nsenter", "unshare")
    if all(shutil.which(b) for b in needed):
        return 0.0
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], timeout=300, env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *SLURM_PACKAGES], timeout=600, env=env)
    return time.monotonic() - start


class SlurmCluster:
    """Two (or more) SLURM nodes in network + UTS namespaces on this machine. See module doc."""

    def __init__(self, workdir: str | Path, num_nodes: int = 2, cpus_per_node: int = 4):
        self.workdir = Path(workdir)
        self.num_nodes = num_nodes
        self.cpus_per_node = cpus_per_node
        self.x = self._free_cluster_number()
        self.bridge = f"s3br{self.x}"
        self.bridge_addr = f"{_SUBNET}.{self.x}.1"
        self.nodes = [f"s3x{self.x}{chr(ord('a') + i)}" for i in range(num_nodes)]
        self.node_addrs = [f"{_SUBNET}.{self.x}.{11 + i}" for i in range(num_nodes)]
        self.ctld_port = 17000 + 2 * self.x
        self.slurmd_port = self.ctld_port + 1
        self.conf = self.workdir / "slurm.conf"
        self.munge_socket = self.workdir / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}
        self._hosts_marker = f"# s3dist-test-cluster-{self.x}-{os.getpid()}"
        self._made_links: list[str] = []
        self._made_netns: list[str] = []

    # ---------------------------------------------------------------- public

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for the SLURM clients (and, exported by sbatch, for the jobs)."""
        return dict(os.environ, SLURM_CONF=str(self.conf), GLOO_SOCKET_IFNAME=NODE_IFNAME, **extra)

    def start(self, timeout: float = 60) -> None:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._make_network()
            self._add_hosts()
            self._start_munge()
            self._write_conf()
            self._start_slurmctld()
            for name in self.nodes:
                self._start_slurmd(name)
            self._wait_nodes_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Tear everything down; safe to call twice and after a partial start."""
        for step in (self._cancel_jobs, self._kill_namespace_processes, self._stop_daemons,
                     self._remove_network, self._remove_hosts):
            try:
                step()
            except Exception as e:  # keep going: a failed step must not leave the rest behind
                print(f"slurm_cluster teardown: {step.__name__} failed: {e}")

    def sbatch(self, args: list[str], cwd: str | Path, env: dict | None = None) -> int:
        """Submit with the given argv (list, no shell); return the job id."""
        proc = _run(["sbatch", "--parsable", *args], cwd=cwd, env=env or self.env())
        return int(proc.stdout.strip().split(";")[0])

    def run_client(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command (squeue, scancel, ...) against this cluster."""
        return _run(argv, env=self.env(), check=check)

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run_client(["scontrol", *args], check=check)

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.scontrol("show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 40) -> str:
        parts = []
        for f in sorted(self.workdir.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---------------------------------------------------------------- network

    @staticmethod
    def _free_cluster_number() -> int:
        links = _run(["ip", "-o", "link", "show"]).stdout
        taken = {int(m) for m in re.findall(r"\bs3br(\d+)\b", links)}
        free = [x for x in range(2, 250) if x not in taken]
        if not free:
            raise ClusterError("no free test cluster number (bridges s3br2..s3br249 all exist)")
        return random.Random(os.getpid()).choice(free)

    def _make_network(self) -> None:
        ip = lambda *a: _run(["ip", *a])  # noqa: E731
        ip("link", "add", self.bridge, "type", "bridge")
        self._made_links.append(self.bridge)
        ip("addr", "add", f"{self.bridge_addr}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, (name, addr) in enumerate(zip(self.nodes, self.node_addrs)):
            host_end, node_end = f"s3v{self.x}h{i}", f"s3v{self.x}n{i}"
            ip("netns", "add", name)
            self._made_netns.append(name)
            ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self._made_links.append(host_end)
            ip("link", "set", node_end, "netns", name)
            ip("link", "set", host_end, "master", self.bridge)
            ip("link", "set", host_end, "up")
            nsip = lambda *a, n=name: _run(["ip", "-n", n, *a])  # noqa: E731
            nsip("link", "set", node_end, "name", NODE_IFNAME)
            nsip("addr", "add", f"{addr}/24", "dev", NODE_IFNAME)
            nsip("link", "set", NODE_IFNAME, "up")
            nsip("link", "set", "lo", "up")
            # No default route on purpose: slurmctld is on the bridge's own subnet, and with a
            # route out, DNS queries (getfqdn in torchrun, gloo) would wait 10 s for a server
            # they cannot reach instead of failing at once.

    def _remove_network(self) -> None:
        for name in reversed(self._made_netns):
            _run(["ip", "netns", "del", name], check=False)
        self._made_netns.clear()
        for link in reversed(self._made_links):
            _run(["ip", "link", "del", link], check=False)
        self._made_links.clear()

    def _edit_hosts(self, edit) -> None:
        # in place (not rename): /etc/hosts is often a bind mount; the lock serialises sessions
        with open(HOSTS_FILE, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            text = f.read()
            new = edit(text)
            if new != text:
                f.seek(0)
                f.write(new)
                f.truncate()

    def _add_hosts(self) -> None:
        lines = "".join(f"{a} {n} {self._hosts_marker}\n" for n, a in zip(self.nodes, self.node_addrs))
        self._edit_hosts(lambda t: t + ("" if t.endswith("\n") or not t else "\n") + lines)

    def _remove_hosts(self) -> None:
        self._edit_hosts(lambda t: "".join(l for l in t.splitlines(keepends=True) if self._hosts_marker not in l))

    # ---------------------------------------------------------------- daemons

    def _spawn(self, key: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{key}.out.log", "ab")
        self._procs[key] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=dict(os.environ, SLURM_CONF=str(self.conf)))
        log.close()

    def _start_munge(self) -> None:
        d = self.munge_socket.parent
        d.mkdir(mode=0o700, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
                               f"--log-file={self.workdir / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged socket", 10)

    def _write_conf(self) -> None:
        w = self.workdir
        (w / "state").mkdir(exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus_per_node} State=UNKNOWN"
                          for n, a in zip(self.nodes, self.node_addrs))
        self.conf.write_text(f"""\
# written by tests/slurm_cluster.py: a throw-away {self.num_nodes}-node cluster on one host
ClusterName=s3test{self.x}
SlurmctldHost={socket.gethostname().split('.')[0]}({self.bridge_addr})
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool-%n
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd-%n.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
ReturnToService=2
# nodes may announce more CPUs than the host has, so several small test jobs can share them
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
MessageTimeout=20
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: _run(["scontrol", "ping"], check=False, env=self.env()).stdout.count("UP") > 0,
                       "slurmctld to answer `scontrol ping`", 30)

    def _start_slurmd(self, name: str) -> None:
        # own UTS namespace (host name = node name), then the node's network namespace
        self._spawn(f"slurmd-{name}", [
            "unshare", "--uts", "--", "sh", "-c", 'hostname "$1" && exec nsenter --net="$2" slurmd -D -N "$1" -f "$3"',
            "sh", name, f"/var/run/netns/{name}", str(self.conf)])

    def _wait_nodes_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, env=self.env()).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n) == "idle" for n in self.nodes)
        self._wait_for(idle, "both slurmd to register idle", timeout)

    def _wait_for(self, cond, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            dead = [k for k, p in self._procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise ClusterError(f"waiting for {what}: " + (f"{dead} exited" if dead else f"timed out after "
                                   f"{timeout}s") + "\n" + self.logs())
            time.sleep(0.2)

    def _cancel_jobs(self) -> None:
        if "slurmctld" not in self._procs or self._procs["slurmctld"].poll() is not None:
            return
        ids = _run(["squeue", "-h", "-o", "%i"], check=False, env=self.env()).stdout.split()
        if ids:
            _run(["scancel", *ids], check=False, env=self.env())
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _run(["squeue", "-h", "-t", "R,CG", "-o", "%i"], check=False,
                                                       env=self.env()).stdout.strip():
                time.sleep(0.5)

    def _kill_namespace_processes(self) -> None:
        # job steps (slurmstepd and what it started) outlive slurmd; they all sit in our namespaces
        daemons = {p.pid for p in self._procs.values()}
        for name in self._made_netns:
            pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in map(int, pids):
                if pid not in daemons:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def _stop_daemons(self) -> None:
        for key in sorted(self._procs, key=lambda k: (k == "munged", k == "slurmctld")):  # slurmd first
            proc = self._procs[key]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self._procs.clear()
