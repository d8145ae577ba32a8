"""math-verify in worker processes, so that its timeouts hold whichever thread or process asks.

math-verify times itself out with SIGALRM, which works only in a process's main thread: called from a scoring
thread it raised, and the answer scored 0. Each worker here is a process of its own whose main thread runs
math-verify (its own timeout applies); the asking thread waits at most twice that and kills the worker when
it has not answered (sympy can hold the interpreter in C code that no signal interrupts)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time

_SERVE = "from dare_mega.rewards.math_pool import serve; serve()"


def serve() -> None:
    """The worker: one JSON request per line on stdin, one JSON answer per line on stdout."""
    from math_verify import parse, verify

    seconds = int(os.environ.get("DARE_MEGA_MATH_SECONDS", "5"))
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing math-verify prints may corrupt the answers
    for line in sys.stdin:
        try:
            request = json.loads(line)
            gold = parse(f"${request['gold']}$", parsing_timeout=seconds)
            guess = parse(f"${request['guess']}$", parsing_timeout=seconds)
            answer = {"ok": bool(gold and guess and verify(gold, guess, timeout_seconds=seconds))}
        except Exception as e:  # noqa: BLE001 - an answer math-verify cannot handle is simply not equivalent
            answer = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class _Worker:
    def __init__(self, seconds: int):
        env = {**os.environ, "DARE_MEGA_MATH_SECONDS": str(seconds)}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env)
        self.buffer = b""

    def ask(self, request: dict, timeout: float) -> dict | None:
        """The answer, or None when the worker did not answer in time (it is then killed)."""
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            self.kill()
            return None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                self.kill()
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.kill()
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class MathWorkers:
    """Up to `size` worker processes, started when first needed and replaced when killed."""

    def __init__(self, seconds: int):
        self.seconds = seconds
        self.idle: list[_Worker] = []
        self.lock = threading.Lock()

    def equivalent(self, gold: str, guess: str) -> tuple[bool, str]:
        """(whether math-verify finds them equivalent, "ok" | "timeout")."""
        with self.lock:
            worker = self.idle.pop() if self.idle else None
        if worker is None or not worker.alive():
            worker = _Worker(self.seconds)
        answer = worker.ask({"gold": gold, "guess": guess}, 2 * self.seconds + 10)
        if answer is None:
            return False, "timeout"
        with self.lock:
            self.idle.append(worker)
        return bool(answer.get("ok")), "ok"

    def close(self) -> None:
        with self.lock:
            workers, self.idle = self.idle, []
        for worker in workers:
            worker.kill()


_pools: dict[int, MathWorkers] = {}
_pools_lock = threading.Lock()


def math_workers(seconds: int) -> MathWorkers:
    with _pools_lock:
        if seconds not in _pools:
            _pools[seconds] = MathWorkers(seconds)
        return _pools[seconds]
