"""One run of a sweep as a `python -m train` subprocess, and how the sweep stops; what both executors share.

A run starts fresh in its folder, or resumes when the folder has a checkpoint. Its output goes to its
training_log.txt, never to the terminal; it gets its threads and GPUs through its environment, and stops when
the sweep does (Ctrl-C, SIGTERM, SIGHUP), or on Linux when the thread that started it dies, so a sweep killed
outright leaves no training behind. An executor (train/sweep.py's local pool, train/sweep_ray.py's trials)
reports each run's start and end through `Events`, by the run's index in the specs it was given.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Protocol

from train.runlog import TEXT_LOG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # runs import this copy of `train`
# Looked up once here: a forked child of a threaded process (a Ray worker) must not load libraries.
PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


class Events(Protocol):
    """What an executor tells the sweep about run i (an index into the specs it was given)."""

    def started(self, i: int, resumed_from: str | None) -> None: ...

    def finished(self, i: int, ok: bool, seconds: float, error: str | None = None) -> None: ...

    def stopped(self, i: int, seconds: float) -> None: ...

    def placed(self, i: int, node: str) -> None: ...


class Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop the runs as Ctrl-C does. A KeyboardInterrupt, since that is what Ray's waits let
    through (as a new one: the signal is kept in STOP_SIGNALS for the exit status)."""


STOP_SIGNALS: list[int] = []


def raise_stop(signum: int, frame: Any) -> None:
    STOP_SIGNALS.append(signum)
    raise Stop(signum)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise Stop in the main thread, which stops the runs as Ctrl-C does."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_stop)


class StopBetweenPolls:
    """Holds Ctrl-C, SIGTERM and SIGHUP back until the local pool sleeps between polls, and raises Stop there.
    Raised at any point, a KeyboardInterrupt can land inside `Popen.poll()` just after it took the Popen's
    internal wait lock, leaving the lock held, so the `wait()` of the stop that follows blocks forever; or
    between a fork and `Popen` returning, losing the child. A signal during the stop itself is only recorded."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> "StopBetweenPolls":
        self.pending: int | None = None
        self.sleeping = False
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for signum, handler in self.previous.items():
            if handler is not signal.SIG_IGN:  # nohup and background jobs ignore some: keep that
                signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame: Any) -> None:
        STOP_SIGNALS.append(signum)
        if self.sleeping:
            raise Stop(signum)
        self.pending = signum

    def sleep(self, seconds: float) -> None:
        if self.pending is not None:
            raise Stop(self.pending)
        self.sleeping = True
        try:
            time.sleep(seconds)
        finally:
            self.sleeping = False


@dataclass
class RunSpec:
    """What any machine needs to start or resume one run (no credentials: it may travel to Ray workers)."""
    folder: str  # absolute
    config: dict[str, Any]
    cwd: str  # where the sweep started: relative paths in the config mean the same for every run


def latest(folder: str) -> str | None:
    """The checkpoint a resume starts from (the run's `latest` pointer), None when it has none."""
    pointer = os.path.join(folder, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip()


def die_with_parent() -> None:
    """Runs in the child before exec (Linux): SIGTERM when the thread that started it dies, so a sweep killed
    alone (kill -9 PID), or a Ray worker that goes away, leaves no training behind."""
    PRCTL(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def last_line(folder: str) -> str:
    """The last line of the run's log that says something: a traceback's exception, `error: ...`, or the line
    the sweep added when a signal killed it."""
    path = os.path.join(folder, TEXT_LOG)
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - 16384, 0))
        lines = f.read().decode(errors="replace").splitlines()
    return next((ln.strip() for ln in reversed(lines) if any(c.isalnum() for c in ln)), "")


class Child:
    """One `python -m train` process: a resume when the folder has a checkpoint, else a fresh start in it (an
    attempt that died before its first checkpoint is cleared). Its stdout repeats training_log.txt and is
    dropped; its stderr (warnings, tracebacks) is appended to training_log.txt, so nothing reaches the terminal.
    storage_options go on the command line, as `python -m train --resume` wants them, never into a file."""

    def __init__(self, spec: RunSpec, threads: int, gpus: str, storage_options: dict | None):
        self.folder, self.stopping, self.started = spec.folder, False, time.time()
        self.resumed_from, self.config_file = latest(spec.folder), None
        if self.resumed_from:
            args = ["--resume", spec.folder]
        else:
            shutil.rmtree(spec.folder, ignore_errors=True)
            os.makedirs(spec.folder)
            fd, self.config_file = tempfile.mkstemp(prefix="sweep-run-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(spec.config, f)
            args = [self.config_file, "--save_folder", spec.folder]
        if storage_options:
            args += ["--storage_options", json.dumps(storage_options)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": gpus}
        with open(os.path.join(spec.folder, TEXT_LOG), "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=spec.cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                         preexec_fn=die_with_parent if PRCTL else None)

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None:
            self.cleanup()
            if rc < 0 and not self.stopping:  # no traceback: say what happened where the error line is read
                with open(os.path.join(self.folder, TEXT_LOG), "a") as f:
                    reason = " (out of memory?)" if rc == -signal.SIGKILL else ""
                    f.write(f"sweep: python -m train was killed by {signal.Signals(-rc).name}{reason}\n")
        return rc

    def seconds(self) -> float:
        return time.time() - self.started

    def cleanup(self) -> None:
        if self.config_file and os.path.exists(self.config_file):
            os.remove(self.config_file)


def stop(children: list[Child], grace: float = 10.0) -> None:
    """SIGTERM every child (a multi-GPU run's launcher passes it to its ranks), SIGKILL what is left after
    `grace` seconds. Checkpoints are written atomically, so each run resumes from its last one."""
    for c in children:
        c.stopping = True
        if c.proc.poll() is None:
            c.proc.terminate()
    deadline = time.time() + grace
    for c in children:
        try:
            c.proc.wait(max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
        c.cleanup()
