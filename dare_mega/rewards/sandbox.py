"""Run untrusted code (model output) in a sandboxed subprocess.

Layers, each enough for a class of escape: a fresh temporary working directory; a network namespace with no
interfaces (`unshare -n`, when the machine allows it); an unprivileged user (nobody) when started as root;
resource limits (CPU seconds, address space, processes, file size, open files); a Python audit hook that
refuses sockets, new processes, native libraries and writes outside the working directory; a wall-clock
timeout that kills the whole process group; and captured output cut at a byte limit.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

_GUARD = r'''
import os, sys
_root = os.path.realpath(os.getcwd())
def _guard(event, args):
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "subprocess.Popen",
                 "os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "ctypes.dlopen",
                 "os.kill", "os.killpg"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1 and args[1] is not None and isinstance(args[1], str) and any(
            c in args[1] for c in "wax+"):
        path = os.path.realpath(args[0]) if isinstance(args[0], (str, bytes)) else None
        if path is not None and not str(path).startswith(_root):
            raise PermissionError(f"sandbox: writing {path} outside the working directory is not allowed")
sys.addaudithook(_guard)
del _guard
'''


@dataclass
class Limits:
    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30
    processes: int = 32
    file_bytes: int = 16 << 20
    output_bytes: int = 1 << 20
    open_files: int = 64


@dataclass
class Result:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


CLONE_NEWNET = 0x40000000


@lru_cache(maxsize=1)
def _unshare_wrapper() -> list[str]:
    """For a non-root parent: an unprivileged user + network namespace, when the kernel allows it."""
    if os.getuid() == 0 or shutil.which("unshare") is None:
        return []
    try:
        ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return ["unshare", "-rn"] if ok else []


def _new_network_namespace() -> None:
    """As root, before dropping privileges: a network namespace with only a down loopback."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
    except (OSError, AttributeError):
        pass


def _usable_by_others(path: str) -> bool:
    """Whether an unprivileged user can execute `path` (every parent directory searchable)."""
    import stat

    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        while parent and parent != "/":
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(parent)
    except OSError:
        return False
    return True


@lru_cache(maxsize=1)
def interpreter() -> tuple[str, bool]:
    """(python to run untrusted code with, whether to drop to the nobody user). As root, prefer an
    interpreter nobody can run (the code needs only the standard library)."""
    if os.getuid() != 0:
        return sys.executable, False
    for candidate in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if candidate and _usable_by_others(candidate):
            return candidate, True
    return sys.executable, False  # stays root: the audit hook and the namespace still apply


def _limit(limits: Limits, directory: str, drop_privileges: bool):
    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.getuid() == 0:
            _new_network_namespace()
        if drop_privileges:  # root ignores RLIMIT_NPROC: run as nobody, who owns (almost) nothing
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))

    return apply


def run_python(code: str, limits: Limits = Limits(), stdin: str = "") -> Result:
    """Execute `code` with the guard in a fresh directory; returns what it printed and how it ended."""
    directory = tempfile.mkdtemp(prefix="dare_mega_sandbox_")
    os.chmod(directory, 0o777)
    try:
        script = os.path.join(directory, "main.py")
        with open(script, "w") as f:
            f.write(_GUARD + "\n" + code)
        os.chmod(script, 0o644)
        python, drop = interpreter()
        cmd = [*_unshare_wrapper(), python, "-I", "-B", script]
        env = {"PATH": "/usr/bin:/bin", "HOME": directory, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=directory, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=_limit(limits, directory, drop))
        return _communicate(proc, stdin, limits)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _communicate(proc: subprocess.Popen, stdin: str, limits: Limits) -> Result:
    import selectors

    if stdin:
        try:
            proc.stdin.write(stdin.encode())
        except BrokenPipeError:
            pass
    proc.stdin.close()
    out, err = bytearray(), bytearray()
    truncated = timed_out = False
    deadline = time.monotonic() + limits.wall_seconds
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, out)
    selector.register(proc.stderr, selectors.EVENT_READ, err)
    open_streams = 2
    while open_streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in selector.select(timeout=min(remaining, 0.5)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            key.data.extend(chunk)
            if len(out) + len(err) > limits.output_bytes:
                truncated = True
                open_streams = 0
                break
    if timed_out or truncated or proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    returncode = proc.returncode
    return Result(returncode, out[: limits.output_bytes].decode(errors="replace"),
                  err[: limits.output_bytes].decode(errors="replace"), timed_out, truncated)
