"""The judge and the candidate of a code reward. This file runs inside the sandbox, never in the trainer.

It is started as `python -I -S -c <this source> judge` with one JSON request on stdin, and is standard
library only (Python 3.8+), because the sandbox's interpreter may not be the trainer's.

- The **judge** reads the request (the candidate's code, the tests, a nonce), makes itself non-dumpable (no
  process of the same user may read its memory, its file descriptors or its environment) and starts the
  **candidate**: a fresh interpreter that runs the model's code, and nothing else.
- Assert tests run in the judge. Every name the candidate's code defines is a proxy there: calling it sends
  the arguments to the candidate as data, the candidate calls its function and sends the result back as
  data, and the judge rebuilds it from builtin types only (no object of the candidate's ever exists in the
  judge, so an `__eq__` that is always true cannot reach an assert). Each `assert` of the tests is one test;
  it passes when the judge itself saw it complete.
- Standard-input tests run the candidate's program once per case and compare what it printed, in the judge.
- The judge writes its verdict, prefixed by the nonce, to a copy of its own stdout taken before the candidate
  existed; the candidate has its own pipes and cannot write there. The candidate's exit status, exceptions
  and output are never the verdict.
"""

import ast
import base64
import builtins
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time

PROTOCOL = 1
MAX_MESSAGE = 8 << 20  # bytes of one message between judge and candidate
MAX_DEPTH = 64  # nesting of a value on the wire
MAX_NAMES = 4096  # names of the candidate's module the judge will proxy
JUDGE_PASS, JUDGE_FAIL = "__dare_judge_pass__", "__dare_judge_fail__"
# modules the judge imports itself when the candidate's code has them under a name the tests may use
IMPORTABLE = frozenset(("math", "cmath", "re", "string", "itertools", "collections", "functools", "heapq",
                        "bisect", "operator", "statistics", "fractions", "decimal", "random", "datetime",
                        "typing", "copy", "array", "numbers", "unicodedata", "textwrap", "json", "hashlib"))


class Unsendable(Exception):
    """A value that is not plain data (it travels as a handle, or not at all)."""


class CandidateError(Exception):
    """The candidate failed to answer a call: it raised, died, timed out or sent something malformed."""


class JudgeTimeout(BaseException):
    """The request's time is up (a BaseException, so that no test's `except Exception` swallows it)."""


# ---- values on the wire ------------------------------------------------------------------------------------
def encode(value, handle_of=None, depth=0):
    """Plain data as JSON; `handle_of(obj)` gives a handle for what is not data (None: refuse)."""
    if depth > MAX_DEPTH:
        raise Unsendable("nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, str, int):
        return value
    if kind is float:
        return value if math.isfinite(value) else {"f": repr(value)}
    if kind is list:
        return [encode(v, handle_of, depth + 1) for v in value]
    if kind is tuple:
        return {"t": [encode(v, handle_of, depth + 1) for v in value]}
    if kind is dict:
        return {"d": [[encode(k, handle_of, depth + 1), encode(v, handle_of, depth + 1)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {"s" if kind is set else "fs": [encode(v, handle_of, depth + 1) for v in value]}
    if kind is bytes:
        return {"b": base64.b64encode(value).decode("ascii")}
    if kind is complex:
        return {"c": [repr(value.real), repr(value.imag)]}
    if handle_of is not None:
        handle = handle_of(value)
        if handle is not None:
            return {"h": handle}
    raise Unsendable("a %s is not plain data" % kind.__name__)


def decode(obj, resolve=None, depth=0):
    """The value `encode` wrote, built from builtin types only; `resolve(handle)` turns handles into objects."""
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    kind = type(obj)
    if obj is None or kind in (bool, str, int, float):
        return obj
    if kind is list:
        return [decode(v, resolve, depth + 1) for v in obj]
    if kind is not dict or len(obj) != 1:
        raise ValueError("malformed value")
    (tag, body), = obj.items()
    if tag == "t" and type(body) is list:
        return tuple(decode(v, resolve, depth + 1) for v in body)
    if tag == "d" and type(body) is list:
        out = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed dict item")
            out[decode(pair[0], resolve, depth + 1)] = decode(pair[1], resolve, depth + 1)
        return out
    if tag in ("s", "fs") and type(body) is list:
        items = [decode(v, resolve, depth + 1) for v in body]
        return set(items) if tag == "s" else frozenset(items)
    if tag == "f" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "b" and type(body) is str:
        return base64.b64decode(body.encode("ascii"), validate=True)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(p) is str for p in body):
        return complex(float(body[0]), float(body[1]))
    if tag == "h" and type(body) is int and resolve is not None:
        return resolve(body)
    raise ValueError("malformed value")


def send(fd, message) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        raise Unsendable("a message of %d bytes (limit %d)" % (len(data), MAX_MESSAGE))
    data = b"%016x" % len(data) + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd, size, deadline):
    chunks, left = [], size
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise CandidateError("no answer in time")
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise CandidateError("the candidate closed its channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd, deadline=None):
    header = _read_exactly(fd, 16, deadline)
    try:
        size = int(header, 16)
    except ValueError:
        raise CandidateError("malformed message header") from None
    if size > MAX_MESSAGE:
        raise CandidateError("a message of %d bytes (limit %d)" % (size, MAX_MESSAGE))
    try:
        return json.loads(_read_exactly(fd, size, deadline))
    except (ValueError, RecursionError) as e:
        raise CandidateError("malformed message (%s)" % type(e).__name__) from None


def describe(obj, handle):
    """How the judge may bind a name of the candidate's module: a module by its name (the judge imports its
    own), an object by where it claims to come from (the judge uses its own copy when that resolves: at best
    the candidate gets what it could have imported), else the handle."""
    entry = {"h": handle}
    if type(obj) is type(sys):
        entry["module"] = obj.__name__
    else:
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if type(module) is str and type(qualname) is str:
            entry["origin"] = [module, qualname]
    return entry


# ---- the candidate (untrusted: anything below may be replaced by the model's code once it has run) ---------
def candidate_main(fd_in, fd_out):
    objects = {}

    def handle_of(obj):
        objects[len(objects) + 1] = obj
        return len(objects)

    def resolve(handle):
        return objects[handle]

    def answer(work):
        try:
            value = work()
        except BaseException as e:  # noqa: B036 - the candidate's failure is reported, whatever it is
            return {"ok": False, "type": type(e).__name__, "message": str(e)[:500]}
        try:
            return {"ok": True, "value": encode(value, handle_of)}
        except Unsendable as e:
            return {"ok": False, "type": "Unsendable", "message": str(e)}

    request = receive(fd_in)
    program = bool(request.get("program"))
    namespace = {"__name__": "__main__" if program else "__candidate__", "__builtins__": builtins}
    sys.argv = ["main.py"]
    try:
        exec(compile(request["code"], "main.py", "exec"), namespace)
    except SystemExit as e:
        if program:  # a program may end itself: its output is what counts
            sys.stdout.flush()
            os._exit(e.code if type(e.code) is int else (0 if e.code is None else 1))
        send(fd_out, {"ok": False, "type": "SystemExit", "message": str(e)[:500]})
        os._exit(1)
    except BaseException as e:  # noqa: B036 - the code did not run to its end
        if program:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        else:
            send(fd_out, {"ok": False, "type": type(e).__name__, "message": str(e)[:500]})
        os._exit(1)
    if program:
        sys.stdout.flush()
        os._exit(0)
    send(fd_out, {"ok": True, "names": {k: describe(v, handle_of(v)) for k, v in list(namespace.items())
                                        if not k.startswith("__")}})
    while True:
        try:
            op = receive(fd_in)
        except CandidateError:
            os._exit(0)
        target = objects.get(op.get("handle"))
        if op.get("op") == "call":
            reply = answer(lambda: target(*decode(op["args"], resolve), **decode(op["kwargs"], resolve)))
        elif op.get("op") == "getattr":
            reply = answer(lambda: getattr(target, op["name"]))
        elif op.get("op") == "list":
            reply = answer(lambda: list(target))
        else:
            reply = {"ok": False, "type": "ProtocolError", "message": "unknown op"}
        send(fd_out, reply)


# ---- the judge ----------------------------------------------------------------------------------------------
def _protect_self() -> None:
    """No process of the same user may ptrace this one or open its /proc files (memory, fds, environment)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def _candidate_limits(limits):
    """What the candidate's process gets, applied again here (the jail already applies them to the judge) for
    backends without a jail; as root, also the unprivileged user 65534."""
    import resource

    def apply():
        for name, value in (("RLIMIT_CPU", limits["cpu_seconds"]), ("RLIMIT_AS", limits["memory_bytes"]),
                            ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_NOFILE", limits["open_files"]),
                            ("RLIMIT_CORE", 0)):
            soft, hard = resource.getrlimit(getattr(resource, name))
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(getattr(resource, name), (value, value))
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        value = limits["processes"] if nproc == resource.RLIM_INFINITY else min(limits["processes"], nproc)
        resource.setrlimit(resource.RLIMIT_NPROC, (value, value))

    return apply


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping the first `keep` bytes (so a chatty program never blocks or fails)."""

    def __init__(self, stream, keep):
        super().__init__(daemon=True)
        self.stream, self.keep, self.data, self.total = stream, keep, bytearray(), 0
        self.start()

    def run(self):
        while True:
            chunk = self.stream.read1(1 << 16) if hasattr(self.stream, "read1") else self.stream.read(1 << 16)
            if not chunk:
                return
            self.total += len(chunk)
            if len(self.data) < self.keep:
                self.data.extend(chunk[: self.keep - len(self.data)])


class Candidate:
    """One run of the model's code in its own interpreter, with its own pipes."""

    def __init__(self, request, program=False, stdin_data=None):
        self.source, self.deadline, self.dead = request["harness"], request["deadline"], False
        self.calls, self.timed_out = 0, False
        to_child, self._in = os.pipe()
        self._out, from_child = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", self.source, "candidate", str(to_child), str(from_child)],
            stdin=subprocess.PIPE if program else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, pass_fds=(to_child, from_child), cwd=request["workdir"], env={},
            start_new_session=True, preexec_fn=_candidate_limits(request["limits"]))
        os.close(to_child)
        os.close(from_child)
        keep = request["limits"]["output_bytes"]
        self.stdout, self.stderr = _Drain(self.proc.stdout, keep), _Drain(self.proc.stderr, keep)
        self.feeder = None
        if program:
            self.feeder = threading.Thread(target=self._feed, args=(stdin_data or "",), daemon=True)
        send(self._in, {"code": request["code"], "program": program})
        if self.feeder:
            self.feeder.start()

    def _feed(self, text):
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.close()
        except OSError:
            pass

    def ready(self):
        """{name: entry} of the candidate's module (see `describe`), after its code ran to the end."""
        names = self._ask(None).get("names")
        if type(names) is not dict or len(names) > MAX_NAMES:
            self.kill()
            raise CandidateError("malformed module listing")
        return {k: v for k, v in names.items() if type(k) is str and k.isidentifier() and type(v) is dict
                and type(v.get("h")) is int}

    def _ask(self, message):
        if self.dead:
            raise CandidateError("the candidate is no longer running")
        try:
            if message is not None:
                send(self._in, message)
            reply = receive(self._out, self.deadline)
        except (CandidateError, OSError, Unsendable) as e:
            self.timed_out = time.monotonic() >= self.deadline
            self.kill()
            raise CandidateError(str(e)) from None
        if type(reply) is not dict:
            self.kill()
            raise CandidateError("malformed reply")
        if not reply.get("ok"):
            if message is None:
                self.kill()
            raise _candidate_exception(reply)
        return reply

    def request(self, op, handle, **fields):
        self.calls += 1
        reply = self._ask({"op": op, "handle": handle, **fields})
        try:
            return decode(reply.get("value"), lambda h: Remote(self, h, "value"))
        except (ValueError, TypeError, RecursionError, MemoryError) as e:
            raise CandidateError("a malformed value (%s)" % e) from None

    def wait(self):
        """(exit status or None when it ran out of time, stdout bytes) of a program run."""
        try:
            status = self.proc.wait(timeout=max(self.deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            status = None
        self.kill()
        self.stdout.join(1.0)
        return status, bytes(self.stdout.data)

    def kill(self):
        self.dead = True
        # as PID 1 of the jail's namespace, everything else in it: no process of this run outlives its candidate
        # (kill(-1) from init spares init); elsewhere only the candidate's own process group
        for pid in ((-1,) if os.getpid() == 1 else ()) + (-self.proc.pid, self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass

    def output(self):
        return {"stdout": self.stdout.data[:2000].decode(errors="replace"),
                "stderr": self.stderr.data[:2000].decode(errors="replace"),
                "bytes": self.stdout.total + self.stderr.total}


def _candidate_exception(reply):
    """The candidate's exception, as a builtin exception of the same name where one exists (so that tests
    expecting e.g. ValueError see one), else a CandidateError."""
    kind = getattr(builtins, str(reply.get("type")), None)
    message = str(reply.get("message", ""))[:500]
    if isinstance(kind, type) and issubclass(kind, Exception) and kind.__module__ == "builtins":
        try:
            return kind(message)
        except Exception:  # noqa: BLE001 - an exception class whose constructor wants other arguments
            pass
    return CandidateError("%s: %s" % (reply.get("type"), message))


class Remote:
    """A name (or a value that is not data) of the candidate's: calls and attribute reads go to it."""

    __slots__ = ("_candidate", "_handle", "_name")

    def __init__(self, candidate, handle, name):
        object.__setattr__(self, "_candidate", candidate)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        def handle_of(obj):
            return obj._handle if type(obj) is Remote and obj._candidate is self._candidate else None

        try:
            payload = {"args": encode(list(args), handle_of), "kwargs": encode(kwargs, handle_of)}
        except Unsendable as e:
            raise CandidateError("cannot pass the arguments to %s: %s" % (self._name, e)) from None
        return self._candidate.request("call", self._handle, **payload)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._candidate.request("getattr", self._handle, name=name)

    def __iter__(self):
        return iter(self._candidate.request("list", self._handle))

    def __repr__(self):
        return "<candidate's %s>" % self._name


class _MarkAsserts(ast.NodeTransformer):
    """Each `assert` records what the judge saw: a pass when it completed, a failure (then the exception goes
    on as before, so the tests' own control flow is unchanged) when it raised."""

    def __init__(self):
        self.count = 0
        self.markers = set()  # `assert False`: a line the tests say must not be reached; passes unless reached

    def visit_Assert(self, node):
        index = self.count
        self.count += 1
        if isinstance(node.test, ast.Constant) and not node.test.value:
            self.markers.add(index)

        def record(name):
            return ast.Expr(ast.Call(ast.Name(name, ast.Load()), [ast.Constant(index)], []))

        guarded = ast.Try(body=[node], handlers=[ast.ExceptHandler(
            type=ast.Name("BaseException", ast.Load()), name=None, body=[record(JUDGE_FAIL), ast.Raise()])],
            orelse=[record(JUDGE_PASS)], finalbody=[])
        return ast.fix_missing_locations(ast.copy_location(guarded, node))


def _bind(candidate, names):
    """The test scope's view of the candidate's names. A builtin's name always means the builtin (a candidate
    that defines `abs` cannot change what the tests' `abs` does), and the name of a standard module the
    module; a module is the judge's own import; an object that claims an importable origin is the judge's
    own copy; anything else is a proxy."""
    import importlib

    scope = {}
    for name, entry in names.items():
        if hasattr(builtins, name):
            continue
        own = None
        try:
            if name in IMPORTABLE:  # `math` in the tests is the math module, whatever the candidate calls math
                own = importlib.import_module(name)
            elif type(entry.get("module")) is str:
                if entry["module"].partition(".")[0] in IMPORTABLE:
                    own = importlib.import_module(entry["module"])
            elif type(entry.get("origin")) is list and len(entry["origin"]) == 2:
                module, qualname = entry["origin"]
                if type(module) is str and type(qualname) is str and module.partition(".")[0] in IMPORTABLE:
                    own = importlib.import_module(module)
                    for part in qualname.split("."):
                        own = getattr(own, part)
        except Exception:  # noqa: BLE001 - not importable here: the candidate's own object, by proxy
            own = None
        scope[name] = own if own is not None else Remote(candidate, entry["h"], name)
    return scope


def _normalized(text):
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").rstrip().split("\n")]
    return lines if lines != [""] else []


def judge_asserts(request, verdict):
    tree = ast.parse(request["tests"], "<tests>")
    marker = _MarkAsserts()
    tree = ast.fix_missing_locations(marker.visit(tree))
    verdict["total"] = marker.count or 1  # tests without asserts: the test program itself is the one test
    passed, failed = set(), set()
    candidate = Candidate(request)
    verdict["candidate"] = candidate
    try:
        names = candidate.ready()
    except Exception as e:  # noqa: BLE001 - whatever the candidate's code did, it did not run to its end
        verdict.update(status="timeout" if candidate.timed_out else "candidate_failed", detail=str(e)[:500])
        return
    scope = {"__name__": "__tests__", "__builtins__": builtins, JUDGE_PASS: passed.add, JUDGE_FAIL: failed.add}
    scope.update(_bind(candidate, names))
    try:
        exec(compile(tree, "<tests>", "exec"), scope)
        verdict["status"] = "ok"
        if not marker.count:
            passed.add(0)
    except Exception as e:  # noqa: BLE001 - a test raised: what did not run did not pass
        verdict.update(status="failed" if failed else "tests_raised",
                       detail="%s: %s" % (type(e).__name__, str(e)[:400]))
    finally:
        if verdict.get("status") == "ok":
            passed |= marker.markers
        elif candidate.timed_out:
            verdict["status"] = "timeout"
        verdict["passed"], verdict["failed"] = sorted(passed - failed), sorted(failed)
        verdict["calls"] = candidate.calls


def judge_program(request, verdict):
    cases = request["cases"]
    verdict.update(total=len(cases), passed=[], status="ok")
    for index, case in enumerate(cases):
        if time.monotonic() >= request["deadline"]:
            raise JudgeTimeout()
        candidate = Candidate(request, program=True, stdin_data=case["input"])
        verdict["candidate"] = candidate
        status, out = candidate.wait()
        if status is None:
            verdict["status"] = "timeout"
        if status == 0 and _normalized(out.decode(errors="replace")) == _normalized(case["output"]):
            verdict["passed"].append(index)


def judge_main():
    real_stdout = os.dup(1)  # the verdict's channel: the candidate never holds this descriptor
    null = os.open(os.devnull, os.O_RDWR)
    verdict = {"protocol": PROTOCOL, "status": "harness_error", "total": 0, "passed": [], "calls": 0}
    nonce = ""
    try:
        request = json.loads(sys.stdin.buffer.read())
        nonce = request["nonce"]
        os.dup2(null, 0)
        os.dup2(null, 1)  # what the tests print goes nowhere
        _protect_self()
        request["deadline"] = time.monotonic() + float(request["seconds"])
        request["workdir"] = request.get("workdir") or os.getcwd()
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                       signal.SIGUSR2):
            signal.signal(number, signal.SIG_IGN)  # the candidate may not interrupt the judge

        def expire(signum, frame):
            raise JudgeTimeout()

        signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, float(request["seconds"]) + 0.5)
        try:
            (judge_program if request["kind"] == "program" else judge_asserts)(request, verdict)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except JudgeTimeout:
        verdict["status"] = "timeout"
    except BaseException as e:  # noqa: B036 - any failure of the judge is a verdict of its own, never a pass
        verdict.update(status="harness_error", detail="%s: %s" % (type(e).__name__, str(e)[:400]))
    candidate = verdict.pop("candidate", None)
    if candidate is not None:
        candidate.kill()
        verdict["output"] = candidate.output()
    line = ("%s %s\n" % (nonce, json.dumps(verdict))).encode()
    while line:
        line = line[os.write(real_stdout, line):]
    os._exit(0)


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else "judge"
    if role == "candidate":
        candidate_main(int(sys.argv[2]), int(sys.argv[3]))
    else:
        judge_main()
