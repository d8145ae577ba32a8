"""Code rewards: the model's code is judged by rewards/harness.py inside a sandbox backend.

Backends (`reward.code.backend`):
- `nsjail` (default): the jail of rewards/jail.py on this machine;
- `sandbox_fusion`: a SandboxFusion server (the service verl uses), through its released client; the same
  judge runs there, so the verdict is as hard to forge, and isolation is the server's;
- unisolated (only with `reward.code.allow_unisolated=true`): a plain subprocess; the judge still decides, but
  the program can reach whatever the trainer's machine lets its user reach.

A record's `tests` is either assert code (the candidate's names are in scope: MBPP, HumanEval's check, most
RL code sets) or a list of {"input", "output"} standard-input cases (LiveCodeBench / TACO style): the program
runs once per case and its output, lines right-stripped, must equal the expected one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from functools import lru_cache

from dare_mega.errors import ConfigError
from dare_mega.rewards import harness
from dare_mega.rewards.jail import ALTERNATIVES, IsolationUnavailable, Jail, Run, find_interpreter, run_bounded
from dare_mega.rewards.types import CodeSettings, Outcome

HARNESS_SOURCE = open(harness.__file__, encoding="utf-8").read()
JUDGE_ARGV = ["-I", "-S", "-c", HARNESS_SOURCE, "judge"]


class SandboxUnavailable(IsolationUnavailable):
    """The sandbox stopped answering during a run (a server down): the run stops rather than train on zeros."""


FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.S)


def extract_code(text: str) -> str:
    """The completion's last fenced code block, else the whole completion."""
    blocks = FENCE.findall(text)
    return blocks[-1] if blocks else text


def humaneval_tests(record: dict) -> str:
    """HumanEval's check, after the prompt's own imports: the tests' `math` is the prompt's import, never a name
    the candidate defined."""
    import ast

    try:
        tree = ast.parse(record["prefix"])
    except SyntaxError:
        return record["tests"]
    imports = [ast.get_source_segment(record["prefix"], node) for node in tree.body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    return "\n".join([*imports, record["tests"]])


def humaneval_code(text: str, record: dict) -> str:
    """HumanEval's candidate: a fenced block if the model wrote one (a whole function), else the prompt's
    signature followed by the completion (a function body)."""
    blocks = FENCE.findall(text)
    return blocks[-1] if blocks else record["prefix"] + text


def check_tests(tests, where: str) -> None:
    """A record's `tests`: assert code, or standard-input cases; refused with the record named."""
    if isinstance(tests, str):
        try:
            compile(tests, f"{where}: tests", "exec")
        except SyntaxError as e:
            raise ConfigError(f"{where}: the tests do not parse (line {e.lineno}: {e.msg})") from None
        return
    if isinstance(tests, list) and tests and all(
            isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)
            for c in tests):
        return
    raise ConfigError(f"{where}: tests must be assert code (a string) or a non-empty list of "
                      f'{{"input": str, "output": str}} cases, got {type(tests).__name__}')


def request_for(code: str, tests, settings: CodeSettings, seconds: float, workdir: str | None) -> dict:
    limits = {"cpu_seconds": settings.cpu_seconds, "memory_bytes": settings.memory_mb << 20,
              "file_bytes": settings.file_mb << 20, "open_files": settings.open_files,
              "processes": settings.processes, "output_bytes": settings.output_bytes}
    request = {"nonce": secrets.token_hex(16), "code": code, "seconds": seconds, "limits": limits,
               "harness": HARNESS_SOURCE, "workdir": workdir}
    if isinstance(tests, str):
        request.update(kind="asserts", tests=tests)
    else:
        request.update(kind="program", cases=[{"input": c["input"], "output": c["output"]} for c in tests])
    return request


def read_verdict(run: Run, nonce: str) -> Outcome:
    """The judge's verdict line (the nonce proves it is the judge's); anything else scores 0."""
    prefix = (nonce + " ").encode()
    lines = [line for line in run.stdout.splitlines() if line.startswith(prefix)]
    stderr = run.stderr.decode(errors="replace").strip()[-300:]
    if run.returncode is None:
        return Outcome(0.0, "timeout", seconds=run.seconds, detail="killed at the wall-clock limit")
    if len(lines) != 1:
        return Outcome(0.0, "no_verdict", seconds=run.seconds, detail=f"exit {run.returncode}; {stderr}")
    try:
        verdict = json.loads(lines[0][len(prefix):])
        total, passed, status = verdict["total"], verdict["passed"], verdict["status"]
        if type(total) is not int or type(passed) is not list or any(type(i) is not int for i in passed):
            raise ValueError("malformed")
    except (ValueError, KeyError, TypeError):
        return Outcome(0.0, "no_verdict", seconds=run.seconds, detail=f"malformed verdict; {stderr}")
    count = len({i for i in passed if 0 <= i < total})
    output = verdict.get("output") or {}
    detail = "; ".join(str(x)[:300] for x in (verdict.get("detail"), output.get("stderr")) if x)
    return Outcome(1.0 if status == "ok" and total >= 1 and count == total else 0.0, str(status), count, total,
                   run.seconds, detail)


# ---- backends ------------------------------------------------------------------------------------------------
class NsjailBackend:
    name = "nsjail"

    def __init__(self, settings: CodeSettings):
        self.jail = Jail.open(settings)
        self.memory_per_sample_mb = self.jail.memory_per_sample_mb

    def judge(self, request: dict) -> Run:
        """The judge's run; a jail that did not start (nsjail's own exit status 255 with its error lines) is
        retried once, then stops the run: a silent 0 for every sample would train on noise."""
        for attempt in range(2):
            run = self.jail.run(JUDGE_ARGV, json.dumps(request).encode(), request["seconds"])
            if run.returncode != 255 or not re.search(rb"^\[[EF]\]", run.stderr, flags=re.M):
                return run
        raise SandboxUnavailable(f"the jail stopped starting: {run.stderr.decode(errors='replace')[-600:]}")

    workdir = "/tmp"

    def describe(self) -> str:
        j = self.jail
        return (f"nsjail {j.binary}, Python {'.'.join(map(str, j.python.version))} ({j.python.executable}), "
                f"memory per sample {'cgroup' if j.cgroups else 'rlimits only'}")


class UnisolatedBackend:
    """The opt-out: the judge in a plain subprocess of this machine (rlimits; the candidate drops to user 65534
    when the trainer is root). Not isolation: chosen only by reward.code.allow_unisolated=true."""

    name = "unisolated"
    workdir = None

    def __init__(self, settings: CodeSettings):
        self.settings = settings
        self.python = find_interpreter(settings.python)
        self.memory_per_sample_mb = settings.memory_mb * settings.processes + settings.tmpfs_mb

    def judge(self, request: dict) -> Run:
        directory = tempfile.mkdtemp(prefix="dare_mega_code_")
        if os.getuid() == 0:
            os.chmod(directory, 0o777)  # the candidate runs as 65534
        try:
            request = {**request, "workdir": directory}
            return run_bounded([self.python.executable, *JUDGE_ARGV], json.dumps(request).encode(),
                               request["seconds"] + 5, env={}, cwd=directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def describe(self) -> str:
        return f"UNISOLATED subprocess, Python {self.python.executable}"


class SandboxFusionBackend:
    """POST /run_code of a SandboxFusion server (sandbox_fusion's client): the judge is the program, the request
    its stdin."""

    name = "sandbox_fusion"
    workdir = None

    def __init__(self, settings: CodeSettings):
        self.settings = settings
        self.memory_per_sample_mb = 64  # the program runs on the server; here only the HTTP call waits

    def judge(self, request: dict) -> Run:
        import time

        from sandbox_fusion import RunCodeRequest, run_code

        start = time.monotonic()
        try:
            response = run_code(RunCodeRequest(code=HARNESS_SOURCE, language="python", stdin=json.dumps(request),
                                               run_timeout=request["seconds"] + 2, compile_timeout=10),
                                endpoint=self.settings.sandbox_fusion_url,
                                max_attempts=self.settings.sandbox_fusion_attempts,
                                client_timeout=request["seconds"] + 60)
        except Exception as e:  # noqa: BLE001 - the client raises bare Exceptions once its retries are spent
            raise SandboxUnavailable(f"SandboxFusion at {self.settings.sandbox_fusion_url} failed: "
                                     f"{type(e).__name__}: {str(e)[:300]}") from None
        result = response.run_result
        if result is None:
            return Run(1, b"", (response.message or "no run result").encode(), time.monotonic() - start)
        timed_out = result.status == "TimeLimitExceeded"
        return Run(None if timed_out else result.return_code, (result.stdout or "").encode(),
                   (result.stderr or "").encode(), time.monotonic() - start)

    def describe(self) -> str:
        return f"SandboxFusion at {self.settings.sandbox_fusion_url}"


SELF_TEST = ("def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5\n")
_lock = threading.Lock()


@lru_cache(maxsize=8)
def _backend(key: tuple):
    settings = CodeSettings(**dict(key))
    if settings.backend == "sandbox_fusion":
        backend = SandboxFusionBackend(settings)
    else:
        try:
            backend = NsjailBackend(settings)
        except IsolationUnavailable as e:
            if not settings.allow_unisolated:
                raise IsolationUnavailable(f"code rewards refused: {e}. {ALTERNATIVES}") from None
            backend = UnisolatedBackend(settings)
            backend.refusal = str(e)
    good, bad, tests = SELF_TEST
    results = [judge(backend, code, tests, settings, 10.0) for code in (good, bad)]
    if [r.score for r in results] != [1.0, 0.0]:
        raise IsolationUnavailable(f"the code judge does not work on {backend.describe()}: a correct program "
                                   f"scored {results[0].score} ({results[0].status}: {results[0].detail}), a "
                                   f"wrong one {results[1].score}")
    return backend


def backend_for(settings: CodeSettings, log=None):
    """The code backend for `settings`, checked end to end once per process (a correct and a wrong program);
    fails closed with IsolationUnavailable. The opt-out is announced through `log` every time it is chosen."""
    with _lock:
        backend = _backend(tuple(sorted(vars(settings).items())))
    if backend.name == "unisolated" and log is not None:
        log("WARNING: reward.code.allow_unisolated=true: model-written code runs WITHOUT isolation, as a plain "
            f"subprocess with rlimits only (the jail is unavailable: {backend.refusal}). It can read what this "
            "machine's user can read, reach the network and outlive its sample.")
    return backend


def judge(backend, code: str, tests, settings: CodeSettings, seconds: float | None = None) -> Outcome:
    seconds = float(seconds or settings.wall_seconds)
    request = request_for(code, tests, settings, seconds, backend.workdir)
    return read_verdict(backend.judge(request), request["nonce"])
