"""A loopback stand-in for a SandboxFusion server, built from its documented API: POST /run_code with a
RunCodeRequest body (code, language, stdin, run_timeout, compile_timeout, files, fetch_files), answered with a
RunCodeResponse (status Success | Failed | SandboxError, message, run_result {status Finished |
TimeLimitExceeded | Error, execution_time, return_code, stdout, stderr}). Bodies are parsed and answers built
with the sandbox_fusion package's own models. Python programs run in dare_mega's jail (the stand-in's own
isolation, as a real server has its own); every request is recorded.

    server = SandboxFusionStandIn().start(); ... server.url ...; server.close()
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SandboxFusionStandIn:
    def __init__(self, fail_times: int = 0):
        from dare_mega.rewards.jail import Jail
        from dare_mega.rewards.types import CodeSettings

        self.jail = Jail.open(CodeSettings())
        self.requests: list[dict] = []
        self.fail_times = fail_times  # answer SandboxError this many times first (the client retries)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def run_code(self, body: dict) -> dict:
        from sandbox_fusion.models import CommandRunResult, CommandRunStatus, RunCodeRequest, RunCodeResponse, RunStatus

        request = RunCodeRequest(**body)  # the client's own schema: a malformed body fails here
        with self.lock:
            self.requests.append(request.dict())
            if self.fail_times > 0:
                self.fail_times -= 1
                return RunCodeResponse(status=RunStatus.SandboxError, message="executor unavailable").dict()
        if request.language != "python":
            return RunCodeResponse(status=RunStatus.Failed, message=f"{request.language} is not served here").dict()
        run = self.jail.run(["-I", "-S", "-c", request.code], (request.stdin or "").encode(), request.run_timeout)
        timed_out = run.returncode is None
        result = CommandRunResult(status=CommandRunStatus.TimeLimitExceeded if timed_out else CommandRunStatus.Finished,
                                  execution_time=run.seconds, return_code=run.returncode,
                                  stdout=run.stdout.decode(errors="replace"), stderr=run.stderr.decode(errors="replace"))
        ok = not timed_out and run.returncode == 0
        return RunCodeResponse(status=RunStatus.Success if ok else RunStatus.Failed, message="",
                               run_result=result).dict()

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                if self.path != "/run_code":
                    self.send_error(404)
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    answer, code = json.dumps(standin.run_code(body)).encode(), 200
                except Exception as e:  # noqa: BLE001 - a request the schema refuses: the server's 422
                    answer, code = json.dumps({"detail": str(e)}).encode(), 422
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        return Handler
