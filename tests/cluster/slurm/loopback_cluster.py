"""A real SLURM cluster on loopback, for tests: munged, slurmctld and one slurmd per node.

Debian's slurm 22.05 runs unchanged as root: every simulated node is a ``slurmd -N nodeK``
listening on its own port of 127.0.0.1. All state (config, munge key and socket, spool,
logs, pid files) lives in one directory, so nothing outside it is touched except
``/etc/hosts`` (node names must resolve: torch's rendezvous connects to ``MASTER_ADDR=node1``).
Clients find the cluster through ``SLURM_CONF``; see :meth:`LoopbackCluster.client_env`.

No accounting daemon is started (``sacct`` fails). submitit's own ``job.wait()`` then never
notices a job that died without writing a result, which is why ``attnxfer.launch.slurm.wait``
polls ``scontrol`` and takes a timeout.

Run it by hand to try ``attnxfer submit`` on this machine::

    python tests/cluster/slurm/loopback_cluster.py start /tmp/slurmtest 2   # prints export SLURM_CONF=...
    python tests/cluster/slurm/loopback_cluster.py stop /tmp/slurmtest
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scontrol", "scancel", "squeue")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the loopback cluster (not root, no apt, daemon failed)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None
    )


def _run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_installed() -> None:
    """Install slurm and munge from Debian if any daemon or client is missing (``apt-get update`` only on failure)."""
    if all(_which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            f"SLURM is not installed and installing it needs root (install {' '.join(APT_PACKAGES)} "
            "with apt-get, run the tests as root, or set ATTNXFER_SKIP_SLURM=1 to skip the SLURM tests)"
        )
    if not shutil.which("apt-get"):
        raise ClusterUnavailable(
            f"SLURM is not installed and apt-get is not available: install {' '.join(APT_PACKAGES)} "
            "(slurm 22.05+) or set ATTNXFER_SKIP_SLURM=1 to skip the SLURM tests"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    result = _run(install, timeout=600, env=env)
    if result.returncode != 0:
        _run(["apt-get", "update", "-q"], timeout=600, env=env)
        result = _run(install, timeout=600, env=env)
    if result.returncode != 0 or not all(_which(d) for d in DAEMONS):
        raise ClusterUnavailable(
            f"`{' '.join(install)}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )


def ensure_hosts(names: list[str], hosts_file: Path = Path("/etc/hosts")) -> None:
    """Make every node name resolve to 127.0.0.1 (one idempotent line in /etc/hosts)."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if missing:
        with hosts_file.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # attnxfer loopback SLURM test cluster\n")


def _free_port_block(count: int, start: int = 16817, stop: int = 30000) -> int:
    """First port p such that p..p+count-1 are all free on 127.0.0.1."""
    for base in range(start, stop, count):
        try:
            socks = []
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ClusterUnavailable(f"no block of {count} free ports between {start} and {stop}")


def _alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _stop_pid(pid_file: Path, grace_s: float = 10.0) -> None:
    pid = _alive(pid_file)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _alive(pid_file) == pid:
            time.sleep(0.05)
        if _alive(pid_file) == pid:
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


@dataclass
class LoopbackCluster:
    """N simulated nodes (``node1..nodeN``) on 127.0.0.1, each advertising ``cpus_per_node`` CPUs."""

    root: Path
    nodes: int = 2
    cpus_per_node: int = 2
    partition: str = "debug"
    # SIGTERM to SIGKILL (slurm's default: 30 s): the ranks save the step and say how the job ends in it; 2 s
    # was too little on a loaded 2-core machine (the job ended, its last line unsaid)
    kill_wait_s: int = 10
    requeue_delay_s: int = 5  # AuthInfo cred_expire: a requeued job waits this long (slurm's default: 120 s)
    node_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        self.node_names = [f"node{i}" for i in range(1, self.nodes + 1)]

    # ---- paths ---------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    def client_env(self) -> dict[str, str]:
        """Environment variables a client (sbatch, scontrol, submitit) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"==> {log} <==\n" + "\n".join(text))
        return "\n".join(out)

    # ---- life cycle ----------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> LoopbackCluster:
        if os.geteuid() != 0:
            raise ClusterUnavailable(
                "the loopback SLURM cluster runs its daemons as root: run the tests as root "
                "or set ATTNXFER_SKIP_SLURM=1 to skip the SLURM tests"
            )
        ensure_installed()
        ensure_hosts(self.node_names)
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        for sub in ("state", "log", "run", *(f"spool/{n}" for n in self.node_names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        ports = _free_port_block(self.nodes + 1)
        self.conf.write_text(self._slurm_conf(ctl_port=ports, node_port=ports + 1))
        env = dict(os.environ, **self.client_env())
        self._daemon([_which("slurmctld"), "-i", "-f", str(self.conf)], env)
        for name in self.node_names:
            self._daemon([_which("slurmd"), "-N", name, "-f", str(self.conf)], env)
        self._wait_idle(timeout_s, env)
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons (slurmd, slurmctld, munged); keeps the logs."""
        run = self.root / "run"
        if not run.is_dir():
            return
        env = dict(os.environ, **self.client_env())
        if _alive(run / "slurmctld.pid") and _which("scancel"):
            _run(
                [_which("scancel"), "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name],
                timeout=30,
                env=env,
            )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                q = _run([_which("squeue"), "-h", "-o", "%i"], timeout=30, env=env)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.2)
        for pid_file in sorted(run.glob("slurmd-*.pid")):
            _stop_pid(pid_file)
        _stop_pid(run / "slurmctld.pid")
        _stop_pid(run / "munged.pid")

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- pieces --------------------------------------------------------------------------
    def _start_munge(self) -> None:
        """A private munged (own key and socket), run as user munge as munged insists."""
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (self.munge_dir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o755)  # clients (root and job users) must reach the socket
        pid_file = self.munge_dir / "munged.pid"
        cmd = [
            "runuser",
            "-u",
            "munge",
            "--",
            _which("munged"),
            "--force",
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={pid_file}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]
        result = _run(cmd, timeout=30)
        if result.returncode != 0:
            raise ClusterUnavailable(f"munged did not start: {result.stderr.strip()}")
        shutil.copy(pid_file, self.root / "run" / "munged.pid")

    def _slurm_conf(self, ctl_port: int, node_port: int) -> str:
        d = self.root
        nodes = f"node[1-{self.nodes}]" if self.nodes > 1 else "node1"
        ports = f"{node_port}-{node_port + self.nodes - 1}" if self.nodes > 1 else str(node_port)
        return f"""\
# attnxfer loopback test cluster (written by tests/cluster/slurm/loopback_cluster.py)
ClusterName=attnxfer-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.requeue_delay_s}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
CommunicationParameters=NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait={self.kill_wait_s}
MinJobAge=600
JobRequeue=1
NodeName={nodes} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} Port={ports} CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN
PartitionName={self.partition} Nodes={nodes} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _daemon(self, cmd: list[str], env: dict[str, str]) -> None:
        result = _run(cmd, timeout=60, env=env)
        if result.returncode != 0:
            raise ClusterUnavailable(
                f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()}\n{self.log_tail()}"
            )

    def _wait_idle(self, timeout_s: float, env: dict[str, str]) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(self.root / "run" / "slurmctld.pid"):
                raise ClusterUnavailable(f"slurmctld died at start-up:\n{self.log_tail()}")
            out = _run([_which("sinfo"), "-h", "-N", "-t", "idle", "-o", "%N"], timeout=30, env=env)
            if out.returncode == 0 and len(set(out.stdout.split())) >= self.nodes:
                return
            time.sleep(0.1)
        raise ClusterUnavailable(f"nodes not idle after {timeout_s:.0f} s:\n{self.log_tail()}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: loopback_cluster.py start|stop DIR [NODES]")
    cluster = LoopbackCluster(Path(sys.argv[2]), nodes=int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    if sys.argv[1] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
