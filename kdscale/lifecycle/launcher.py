"""kdscale's job launcher: a thin wrapper around ``accelerate launch`` (or any launcher
command) that gives the job the status its ranks agreed on, with one line and no
traceback, however the job is signalled.

    python -m kdscale.lifecycle.launcher accelerate launch [flags] -m kdscale.train ...

``launch/accelerate.sh`` and ``slurm/node.sh`` run every multi-process job through it.

- **Signals.** The launcher command starts with SIGINT, SIGTERM and SIGUSR1 ignored
  (torch elastic's agent is told to handle only SIGHUP and SIGQUIT: torchrun's
  ``--signals-to-handle``, through ``PET_SIGNALS_TO_HANDLE``), so it survives them and prints no
  ``SignalException``. This wrapper catches them and passes each on to every rank (which
  registered its pid in the job's status folder); a signal that reaches every process of
  the job (``scancel``, a time limit, Ctrl-C in the terminal) reaches the ranks directly as
  well, and a rank takes the same signal once. The ranks agree on a stop step, write a
  checkpoint and report.
- **Statuses.** Each rank writes its status and one line of reason to the folder
  (:func:`kdscale.lifecycle.exit.report_and_exit`). A stop every rank agreed on (0, 130,
  143) lets the launcher command end normally; this wrapper then exits with that status.
  Any other status (a refused run 2, a stall 3, a rank's failure 1) makes this wrapper end
  the whole job at once (SIGKILL to the launcher command first, then to every process
  carrying the job's folder in its environment: ranks, loader workers, helpers) and exit
  with it. A launcher command that fails with no rank status (a rank killed with -9) gives
  its own status.
- **Nothing outlives the job.** The launcher command dies with this wrapper
  (``PR_SET_PDEATHSIG``), and its ranks then stop on their own (they watch their parent).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from kdscale.lifecycle.exit import STATUS_DIR_ENV, STOP_STATUSES
from kdscale.lifecycle.stop import STOP_SIGNALS

POLL_S = 0.1
PR_SET_PDEATHSIG = 1


def _launcher_preexec() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def job_processes(folder: str) -> list[int]:
    """Every live process whose environment carries this job's status folder."""
    marker = f"{STATUS_DIR_ENV}={folder}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


class Job:
    def __init__(self, command: list[str]):
        self.command = command
        self.folder = tempfile.mkdtemp(prefix="kdscale-job-")
        self.pending: list[int] = []
        self.delivered: set[tuple[int, int]] = set()
        self.child: subprocess.Popen | None = None

    def _on_signal(self, signum, _frame) -> None:
        if signum not in self.pending:
            self.pending.append(signum)

    def rank_pids(self) -> list[int]:
        pids = []
        for path in glob.glob(os.path.join(self.folder, "rank*.pid")):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(open(path).read().strip()))
        return pids

    def statuses(self) -> list[dict]:
        out = []
        for path in sorted(glob.glob(os.path.join(self.folder, "rank*.json"))):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.load(open(path)))
        return sorted(out, key=lambda status: status.get("rank", 0))

    def forward(self) -> None:
        """Pass every signal this wrapper got on to every registered rank, once each."""
        for signum in self.pending:
            for pid in self.rank_pids():
                if (signum, pid) not in self.delivered:
                    self.delivered.add((signum, pid))
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signum)

    def kill(self) -> None:
        """SIGKILL the launcher command first (so its agent reports nothing), then the rest."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, signal.SIGKILL)
        for _ in range(3):
            pids = job_processes(self.folder)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        self.child.wait()

    def run(self) -> int:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        # torchrun's --signals-to-handle (its default comes from PET_SIGNALS_TO_HANDLE; accelerate
        # parses torchrun's arguments) sets TORCHELASTIC_SIGNALS_TO_HANDLE for its agent.
        env = dict(os.environ, **{STATUS_DIR_ENV: self.folder, "PET_SIGNALS_TO_HANDLE": "SIGHUP,SIGQUIT",
                                  "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGHUP,SIGQUIT"})
        try:
            self.child = subprocess.Popen(self.command, env=env, preexec_fn=_launcher_preexec)
        except OSError as err:
            print(f"kdscale: error: cannot start {self.command[0]!r}: {err}", file=sys.stderr)
            return 2
        try:
            return self._watch()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _watch(self) -> int:
        while True:
            try:
                returncode = self.child.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                returncode = None
            self.forward()
            failed = [s for s in self.statuses() if s.get("code") not in STOP_STATUSES]
            if failed:
                self.kill()
                return self._report(failed[0])
            if returncode is not None:
                break
        statuses = self.statuses()
        if returncode == 0 and statuses:
            return self._report(statuses[0])
        if returncode != 0:
            self.kill()  # whatever of the job is left (a rank blocked on its dead peer, helpers)
            print(f"kdscale: the job failed: the launcher exited with status {returncode} and no rank reported "
                  f"why (a rank killed outright?)", file=sys.stderr, flush=True)
            return returncode if returncode > 0 else 128 - returncode
        return 0

    @staticmethod
    def _report(status: dict) -> int:
        code, reason = int(status.get("code", 1)), status.get("reason") or ""
        if code not in (0, 2) or (code == 0 and reason):  # a refused run's rank printed its one line already
            print(f"kdscale: job ended with status {code}" + (f": {reason}" if reason else ""), file=sys.stderr,
                  flush=True)
        return code


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("usage: python -m kdscale.lifecycle.launcher LAUNCHER [ARGS...]  (e.g. accelerate launch ...)",
              file=sys.stderr)
        return 2
    return Job(command).run()


if __name__ == "__main__":
    sys.exit(main())
