"""A real 2-node Slurm cluster on this machine for the tests (Debian's slurm-wlm + munge).

Two slurmd daemons (node1, node2, both at 127.0.0.1, one CPU each) and one slurmctld, all
state under a temporary directory, private ports; stopped by their pid files afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_available() -> str | None:
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(tool) is None]
    return f"not installed: {', '.join(missing)} (launch/setup-slurm.sh installs them)" if missing else None


class SlurmCluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.pid_files: list[str] = []
        self.munged: subprocess.Popen | None = None

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving this machine
        if not os.path.isfile("/etc/munge/munge.key"):
            subprocess.run(["mungekey", "--create"], check=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        self.pid_files.append("/run/munge/munged.pid")
        deadline = time.monotonic() + 20
        while not os.path.exists("/run/munge/munge.socket.2") and time.monotonic() < deadline:
            time.sleep(0.2)

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        ports = [_free_port() for _ in range(3)]
        lines = [
            "ClusterName=kdscaletest", f"SlurmctldHost={host}", f"SlurmctldPort={ports[0]}", "SlurmUser=root",
            "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2", "JobRequeue=1", "MinJobAge=300", "KillWait=10",
            f"StateSaveLocation={self.root}/state", f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdSpoolDir={self.root}/spool-%n",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid", f"SlurmdLogFile={self.root}/slurmd-%n.log",
            f"NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]} CPUs=1 RealMemory=8000",
            f"NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[2]} CPUs=1 RealMemory=8000",
            "PartitionName=debug Nodes=node[1-2] Default=YES State=UP MaxTime=INFINITE",
        ]
        os.makedirs(os.path.join(self.root, "state"), exist_ok=True)
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def start(self) -> "SlurmCluster":
        self._start_munge()
        self._write_conf()
        subprocess.run(["slurmctld", "-f", self.conf], check=True, env=self.env)
        self.pid_files.append(os.path.join(self.root, "slurmctld.pid"))
        for node in ("node1", "node2"):
            subprocess.run(["slurmd", "-N", node, "-f", self.conf], check=True, env=self.env)
            self.pid_files.append(os.path.join(self.root, f"slurmd-{node}.pid"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%t %D"]).stdout.split()
            if out[:2] == ["idle", "2"]:
                return self
            time.sleep(1)
        raise RuntimeError(f"the test Slurm cluster did not come up: {self.run(['sinfo']).stdout}\n"
                           f"{open(os.path.join(self.root, 'slurmctld.log')).read()[-2000:]}")

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, env={**self.env, **kw.pop("env", {})}, **kw)

    def job_state(self, job_id: str) -> str:
        out = self.run(["scontrol", "show", "job", job_id]).stdout
        for token in out.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(2)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")

    def stop(self) -> None:
        self.run(["scancel", "--full", "-u", "root"])
        for pid_file in reversed(self.pid_files):
            try:
                pid = int(open(pid_file).read().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
        time.sleep(1)
        for pid_file in self.pid_files:
            try:
                os.kill(int(open(pid_file).read().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
