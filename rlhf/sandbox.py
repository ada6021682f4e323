"""Run untrusted Python (a model's code answer and the row's tests) in a subprocess with bounded
cost: wall-clock and CPU-time limits, an address-space limit, a cap on the bytes it may write,
no child processes, no inherited environment (so no secrets), a fresh temporary working
directory removed afterwards, and its whole process group killed when the time is up.

This bounds what a response can cost the trainer; it is not a security boundary against a
hostile program (it can still read files the user can read). Run untrusted code from the
internet in a container as well.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Bytes of stdout+stderr a program may write (to files in its directory); past it the
#: kernel stops it with SIGXFSZ.
MAX_OUTPUT_BYTES = 1 << 20


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    """The program exited with status 0 within its limits."""
    reason: str
    """'ok', or why not: 'timeout after 5s', 'exit 1: AssertionError...', 'memory limit'..."""
    seconds: float


def _limits(cpu_s: int, memory_mb: int, output_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec
        import resource

        os.setsid()  # its own process group: killed as a whole on timeout
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        memory = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
        # No fork for a non-root user (root is exempt: there the group kill below bounds it).
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 2000))
            tail = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return tail[-1][:200] if tail else ""


def run_python(
    code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, output_bytes: int = MAX_OUTPUT_BYTES
) -> SandboxResult:
    """Run `code` with `python -I` (isolated: no user site, no PYTHON* variables) under the
    limits above. Never raises for anything the program does."""
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-sandbox-"))
    try:
        (workdir / "main.py").write_text(code)
        with (workdir / "out.txt").open("wb") as out:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "main.py"],
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"},
                    # The CPU-time limit is a backstop a second past the wall clock.
                    preexec_fn=_limits(math.ceil(timeout_s) + 1, memory_mb, output_bytes),
                    close_fds=True,
                )
            except OSError as err:
                return SandboxResult(False, f"could not start: {err}", time.perf_counter() - start)
            try:
                code_ = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return SandboxResult(
                    False, f"timeout after {timeout_s:g}s", time.perf_counter() - start
                )
            finally:
                _kill_group(proc)  # anything it left behind in its group
        seconds = time.perf_counter() - start
        if code_ == 0:
            return SandboxResult(True, "ok", seconds)
        return SandboxResult(False, _why(code_, workdir / "out.txt", output_bytes), seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _why(code: int, out: Path, output_bytes: int) -> str:
    if out.stat().st_size >= output_bytes:
        return f"output limit ({output_bytes} bytes)"
    if code < 0:
        name = signal.Signals(-code).name
        what = {
            "SIGXFSZ": "output limit",
            "SIGXCPU": "CPU-time limit",
            "SIGKILL": "killed (CPU-time limit)",
        }.get(name, name)
        return f"{what} ({name})"
    last = _last_line(out)
    if "MemoryError" in last:
        return f"memory limit: {last}"
    return f"exit {code}: {last}" if last else f"exit {code}"
