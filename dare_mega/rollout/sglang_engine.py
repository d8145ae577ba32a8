"""Rollouts on SGLang servers behind the RolloutEngine interface: launch, checks, health, batching, restarts.

Each server the project launches is `python -m dare_mega.rollout.sglang_server --model-path ... --dllm-algorithm
DareMegaDecoding --dllm-algorithm-config FILE` (SGLang's own launcher with the project's dLLM algorithm
registered, rollout/sglang_algorithm.py); FILE always holds the model's block size and, for DareMegaDecoding, its
mask id, since SGLang otherwise uses per-architecture defaults and ignores config.json. Servers someone else
started are checked on connect (`check_server`): the algorithm they run, and their block size and mask id
against the model's; a mismatch is refused, not decoded. Requests are split into batches and spread over the
servers; a launched server that stops answering is restarted from the newest weights written for it (the disk
transport's last export, else the original model, then `on_restart(i)` so the trainer can push its current
weights) and the batch is sent again.

What SGLang 0.5.23 does not give (docs/scaling.md): per-token denoising steps and log-probs in its responses
(the trainer rebuilds them for DareMegaDecoding servers by replaying the decoding, rollout/replay.py); and its
own algorithms (LowConfidence, JointThreshold, JointThresholdInDel) take the argmax whatever the temperature, so
GRPO groups from them would be identical. DareMegaDecoding samples (temperature, top_p, top_k, per-request
seeds) with the request's own unmasking settings. The refusals come up front with the reason (`check_usable`).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import yaml

from dare_mega.errors import ConfigError
from dare_mega.rollout.sglang_client import SGLangClient, SGLangError
from dare_mega.rollout.types import Completion, SamplingParams, prompt_ids

PROJECT_ALGORITHM = "DareMegaDecoding"
GREEDY_ALGORITHMS = ("LowConfidence", "JointThreshold", "JointThresholdInDel")  # sglang 0.5.23's, all argmax


@dataclass
class SGLangServerConfig:
    """How a server decodes the model. `block_size` / `mask_id` / `architecture`: the model's (`for_model`)."""

    model_path: str
    block_size: int
    mask_id: int
    architecture: str
    tp: int = 1
    dllm_algorithm: str = PROJECT_ALGORITHM
    dllm_config: dict = field(default_factory=dict)  # more algorithm settings, e.g. {"threshold": 0.9}
    host: str = "127.0.0.1"
    mem_fraction_static: float = 0.8
    max_running_requests: int = 64  # dLLM serving defaults to ONE request at a time otherwise
    extra_args: list[str] = field(default_factory=list)
    launcher: list[str] = field(default_factory=lambda: [sys.executable, "-m", "dare_mega.rollout.sglang_server"])

    @classmethod
    def for_model(cls, model_path: str, args, **kwargs) -> "SGLangServerConfig":
        return cls(model_path, args.diffusion.block_size, args.diffusion.mask_token_id, args.architecture, **kwargs)

    def sglang_defaults(self) -> dict:
        """The block size and mask id SGLang gives this architecture when nothing overrides them."""
        from dare_mega.models.family import family_for

        defaults = family_for(self.architecture).sglang_dllm
        if defaults is None:
            raise ConfigError(f"{self.architecture}: SGLang 0.5.23 does not serve it as a diffusion LLM "
                              "(sglang/srt/dllm/config.py); use rollout.backend=native or megatron")
        return defaults

    def algorithm_config(self) -> dict:
        """What --dllm-algorithm-config holds. SGLang's own algorithms cannot take another mask id than their
        architecture default: a model with another one is refused here."""
        defaults = self.sglang_defaults()
        given = dict(self.dllm_config)
        for key, value in (("block_size", self.block_size), ("mask_id", self.mask_id)):
            if key in given and int(given[key]) != value:
                raise ConfigError(f"sglang dllm_config {key}={given[key]} differs from the model's {key}={value} "
                                  f"({self.model_path}); leave it out, it is taken from the model")
        given["block_size"] = self.block_size
        if self.dllm_algorithm == PROJECT_ALGORITHM:
            given["mask_id"] = self.mask_id
        elif self.mask_id != defaults["mask_id"]:
            raise ConfigError(f"SGLang's {self.dllm_algorithm} fills blocks with mask id {defaults['mask_id']} "
                              f"(its default for {self.architecture}) but the model's mask token is {self.mask_id} "
                              f"({self.model_path}); serve it with {PROJECT_ALGORITHM}, which takes the model's")
        else:
            given.pop("mask_id", None)
        return given

    def command(self, port: int, model_path: str, config_file: str) -> list[str]:
        command = [*self.launcher, "--model-path", model_path, "--tp-size", str(self.tp), "--host", self.host,
                   "--port", str(port), "--dllm-algorithm", self.dllm_algorithm, "--mem-fraction-static",
                   str(self.mem_fraction_static), "--max-running-requests", str(self.max_running_requests),
                   "--trust-remote-code", "--dllm-algorithm-config", config_file]
        return command + list(self.extra_args)


def check_usable(algorithm: str, estimator: str, needs, temperature: float, group_size: int,
                 without_step_maps=()) -> None:
    """Refuse, before anything starts, the combinations that SGLang's dLLM serving cannot train. `needs`: what
    the estimator needs from the rollout ("step_maps", ...); `without_step_maps`: the estimators that need none.
    Step maps come from the trainer's replay of DareMegaDecoding (rollout/replay.py), so they need that algorithm
    on the servers."""
    if "step_maps" in needs and algorithm != PROJECT_ALGORITHM:
        raise ConfigError(f"algorithm.estimator={estimator} replays each token's denoising step; SGLang's responses "
                          f"carry no reveal steps or log-probs, and the trainer rebuilds them by replaying "
                          f"{PROJECT_ALGORITHM}, not SGLang's {algorithm}; serve with sglang.dllm_algorithm="
                          f"{PROJECT_ALGORITHM}, or use an estimator that needs no step map "
                          f"({', '.join(without_step_maps)})")
    if algorithm in GREEDY_ALGORITHMS and temperature > 0 and group_size > 1:
        raise ConfigError(f"SGLang's {algorithm} decodes greedily (it ignores temperature={temperature}), "
                          f"so the {group_size} completions of a group would be identical and their advantages 0; "
                          f"serve with {PROJECT_ALGORITHM} (sglang.dllm_algorithm), which samples")


def check_server(client: SGLangClient, config: SGLangServerConfig) -> str:
    """Refuse a server that would decode the model wrong: another algorithm than the configured one, or another
    block size or mask id than the model's. Returns the algorithm it runs."""
    info = client.server_info()
    running = info.get("dllm_algorithm")
    if running is None:
        raise SGLangError(f"{client.url} serves {info.get('model_path')} without --dllm-algorithm: not as a "
                          "diffusion LLM")
    if config.dllm_algorithm not in (None, running):
        raise SGLangError(f"{client.url} runs --dllm-algorithm {running}, but sglang.dllm_algorithm is "
                          f"{config.dllm_algorithm}")
    probe = dataclasses.replace(config, dllm_algorithm=running)
    if running == PROJECT_ALGORITHM:
        # the server compares the request's claims with its configuration and refuses a mismatch (HTTP 400)
        client.generate([[0]], {"max_new_tokens": 1, "temperature": 0.0, "custom_params": claims(probe)})
        return running
    expected = probe.algorithm_config()["block_size"]
    defaults = probe.sglang_defaults()
    path = info.get("dllm_algorithm_config")
    if path is None:
        served = defaults["block_size"]
    elif os.path.exists(path):
        served = int((yaml.safe_load(open(path)) or {}).get("block_size", defaults["block_size"]))
    else:
        raise SGLangError(f"{client.url} runs {running} with --dllm-algorithm-config {path}, which is not readable "
                          f"here, so its block size is unknown; make the file readable or serve with "
                          f"{PROJECT_ALGORITHM}, which checks every request")
    if served != expected:
        raise SGLangError(f"{client.url} decodes with block size {served} ({path or 'the architecture default'}), "
                          f"but the model's block size is {expected} ({config.model_path})")
    return running


def claims(config: SGLangServerConfig, params: SamplingParams | None = None) -> dict:
    """custom_params of every request to a DareMegaDecoding server: what the trainer's model is (checked by the
    server) and how to unmask (`params`' policy, threshold, steps, entropy bound, eps and alg_temp: used by the
    server)."""
    claim = {"block_size": config.block_size, "mask_id": config.mask_id}
    if params is not None:
        claim.update(policy=params.policy, threshold=params.threshold, steps=params.steps,
                     entropy_bound=params.entropy_bound, eps=params.eps, alg_temp=params.alg_temp)
    return {"dare_mega": claim}


class SGLangEngine:
    def __init__(self, config: SGLangServerConfig, ports: list[int], batch_size: int = 64,
                 startup_timeout: float = 900.0, max_restarts: int = 3, tokenizer=None, on_restart=None,
                 log_dir: str | None = None, block_size: int = 0):
        """Launch one server per port on this machine. `SGLangEngine.connect(urls)` uses running servers."""
        if not ports:
            raise ConfigError("SGLangEngine needs at least one server port")
        algorithm_config = config.algorithm_config()  # refuses a model SGLang would decode wrong
        self.block_size, self.algorithm = config.block_size, config.dllm_algorithm
        self.config, self.ports = config, list(ports)
        self.batch_size, self.startup_timeout, self.max_restarts = batch_size, startup_timeout, max_restarts
        self.tokenizer, self.on_restart = tokenizer, on_restart
        self.weights_path: str | None = None  # set by the disk transport after each export
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="sglang-logs-")
        os.makedirs(self.log_dir, exist_ok=True)
        self._config_file = os.path.join(self.log_dir, "dllm_config.yaml")
        with open(self._config_file, "w") as f:
            yaml.safe_dump(algorithm_config, f)
        self.clients = [SGLangClient(f"http://{config.host}:{port}") for port in self.ports]
        self.procs: list[subprocess.Popen | None] = [None] * len(self.ports)
        self.restarts = [0] * len(self.ports)
        for i in range(len(self.ports)):
            self._launch(i)
        for i in range(len(self.ports)):
            self._wait(i)

    @classmethod
    def connect(cls, urls: list[str], config: SGLangServerConfig, batch_size: int = 64, tokenizer=None,
                first: int = 0) -> "SGLangEngine":
        """Servers someone else runs (a launch script, Ray): checked (`check_server`; config.dllm_algorithm None
        takes whatever they run), no restarts from here. Batches start at server `first` (a data-parallel rank's
        own server)."""
        self = cls.__new__(cls)
        self.config, self.ports, self.batch_size, self.tokenizer = config, [], batch_size, tokenizer
        self.block_size = config.block_size
        self.on_restart, self.weights_path, self.max_restarts = None, None, 0
        n = len(urls)
        self.clients = [SGLangClient(urls[(first + k) % n]) for k in range(n)]
        running = {check_server(client, config) for client in self.clients}
        if len(running) > 1:
            raise SGLangError(f"the servers {urls} run different dLLM algorithms: {sorted(running)}")
        self.algorithm = running.pop()
        self.procs, self.restarts = [None] * n, [0] * n
        return self

    # ---- servers ------------------------------------------------------------------------------------------
    def _launch(self, i: int) -> None:
        model = self.weights_path or self.config.model_path
        log = open(os.path.join(self.log_dir, f"server{i}.log"), "a")
        self.procs[i] = subprocess.Popen(self.config.command(self.ports[i], model, self._config_file),
                                         stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, i: int) -> None:
        deadline = time.time() + self.startup_timeout
        while not self.clients[i].healthy(timeout=5):
            if self.procs[i].poll() is not None:
                raise SGLangError(f"SGLang server {i} exited with {self.procs[i].returncode} while starting; "
                                  f"see {os.path.join(self.log_dir, f'server{i}.log')}")
            if time.time() > deadline:
                raise SGLangError(f"SGLang server {i} on port {self.ports[i]} not healthy after "
                                  f"{self.startup_timeout:.0f} s")
            time.sleep(0.5)

    def restart(self, i: int) -> None:
        if self.procs[i] is None and not self.ports:
            raise SGLangError(f"SGLang server {self.clients[i].url} is down and was not launched by this engine")
        if self.restarts[i] >= self.max_restarts:
            raise SGLangError(f"SGLang server {i} failed {self.restarts[i]} times; giving up")
        self.restarts[i] += 1
        if self.procs[i] is not None and self.procs[i].poll() is None:
            self.procs[i].kill()
            self.procs[i].wait()
        print(f"sglang: restarting server {i} (port {self.ports[i]}) from {self.weights_path or 'the model'}",
              file=sys.stderr, flush=True)
        self._launch(i)
        self._wait(i)
        if self.on_restart is not None:
            self.on_restart(i)

    def alive(self, i: int) -> bool:
        running = self.procs[i] is None or self.procs[i].poll() is None  # connected servers: only HTTP tells
        return running and self.clients[i].healthy(timeout=5)

    def shutdown(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    @property
    def weight_version(self) -> str:
        return self.clients[0].weight_version()

    def load_weights(self, named_tensors, version=None):
        raise NotImplementedError("SGLang engines receive weights through dare_mega.weight_sync transports")

    # ---- generation ---------------------------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams = SamplingParams(), cache: bool = True) -> list[Completion]:
        """`cache` is accepted for the RolloutEngine interface; SGLang always caches the committed blocks."""
        ids = [self._ids(p) for p in prompts]
        sampling = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p}
        if params.top_k:
            sampling["top_k"] = params.top_k
        if params.stop_token_ids is not None:
            sampling["stop_token_ids"] = list(params.stop_token_ids)
        if params.stop:
            sampling["stop"] = list(params.stop)
        if self.algorithm == PROJECT_ALGORITHM:
            sampling["custom_params"] = claims(self.config, params)
        # DareMegaDecoding seeds request i from its id's '#<seed>' suffix: the native engine's seeds
        seeds = [params.seeds[i] if params.seeds else (None if params.seed is None else params.seed + i)
                 for i in range(len(ids))]
        rids = [f"{uuid.uuid4().hex}#{seed}" if seed is not None else uuid.uuid4().hex for seed in seeds]
        out: list[Completion | None] = [None] * len(ids)
        batches = [list(range(s, min(s + self.batch_size, len(ids)))) for s in range(0, len(ids), self.batch_size)]
        for b, batch in enumerate(batches):
            server = b % len(self.clients)
            while True:
                try:
                    answers = self.clients[server].generate([ids[k] for k in batch], sampling,
                                                            rids=[rids[k] for k in batch])
                    break
                except SGLangError:
                    if self.alive(server):
                        raise  # the server is up and refused the request: a real error
                    self.restart(server)
            for k, answer in zip(batch, answers):
                out[k] = self._completion(ids[k], answer, seeds[k])
        return out

    def _ids(self, prompt) -> list[int]:
        return prompt_ids(prompt, self.tokenizer)

    def _completion(self, prompt_ids: list[int], answer: dict, seed: int | None) -> Completion:
        meta = answer.get("meta_info", {})
        reason = (meta.get("finish_reason") or {}).get("type", "length")
        version = str(meta.get("weight_version", "0"))
        output = list(answer.get("output_ids") or [])
        return Completion(prompt_ids=prompt_ids, completion_ids=output, text=answer.get("text", ""),
                          finish_reason="stop" if reason == "stop" else "length", logprobs=[], reveal_steps=[],
                          generated_ids=output, generated_logprobs=[], generated_reveal_steps=[],
                          block_size=self.block_size, forwards=0,
                          weight_version=int(version) if version.isdigit() else 0, seed=seed)
