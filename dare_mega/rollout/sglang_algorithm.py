"""DareMegaDecoding: the native engine's block decoding as an SGLang dLLM algorithm (sglang 0.5.23's
`DllmAlgorithm`), so that an SGLang server samples and unmasks as rollout/decoder.py does. Imported only inside
SGLang processes (it imports sglang); registered by rollout/sglang_plugin.py.

Serve it with `--dllm-algorithm DareMegaDecoding --dllm-algorithm-config FILE.yaml` (SGLangServerConfig writes
the file). Its keys:
  block_size     SGLang's own key: the block size its scheduler uses (the model's)
  mask_id        the model's mask token. SGLang fills new blocks with its per-architecture id whatever the model
                 says; this algorithm replaces it by the model's before every forward
  policy, threshold, steps, entropy_bound
                 the unmasking settings of rollout/types.py's SamplingParams (defaults as there)
Per request, from SGLang's batch: temperature, top_p and top_k (SGLang sends greedy requests as top_k = 1,
temperature 1: decoded here as the native engine's temperature 0); the seed from the request id
('<anything>#<seed>', what SGLangEngine sends), else a hash of the id. Each block draws its uniforms from its own
generator, seeded by (request seed, block index from the block's positions): the native engine's, so the same
logits give the same tokens and reveals (tests/test_sglang_algorithm.py), a block that SGLang decodes again
(a retracted request) draws the same numbers, and the trainer can replay the trajectory (rollout/replay.py).
Every dare_mega request carries custom_params {"dare_mega": {"block_size": B, "mask_id": M, "policy": ...,
"threshold": ..., "steps": ..., "entropy_bound": ...}}: a server configured with another block size or mask id
refuses it (HTTP 400 naming both values) before decoding anything; the unmasking settings it carries are used
for that request (the server's own are the defaults of requests without them), so the trainer's rollout
settings are what decodes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from sglang.srt.dllm.algorithm.base import DllmAlgorithm
from sglang.srt.sampling.sampling_params import TOP_K_ALL

from dare_mega.rollout.policies import block_generator, denoise_step
from dare_mega.rollout.types import POLICIES, SamplingParams

CLAIM = "dare_mega"  # the custom_params key of a request's claims about the server's configuration
# per-request settings a claim may carry
UNMASKING = ("policy", "threshold", "steps", "entropy_bound", "eps", "alg_temp")
REQUESTS_KEPT = 16384  # requests whose settings are remembered (far more than a server runs at once)


def request_seed(rid: str) -> int:
    """'<anything>#<seed>' -> seed; any other id -> a stable 63-bit hash of it."""
    head, sep, tail = (rid or "").rpartition("#")
    if sep and tail.lstrip("-").isdigit():
        return int(tail)
    return int.from_bytes(hashlib.blake2b((rid or "").encode(), digest_size=8).digest(), "little") >> 1


def unmasking(given: dict, defaults: dict, where: str) -> dict:
    """policy / threshold / steps / entropy_bound / eps / alg_temp from `given`, else `defaults`; a bad value
    raises ValueError naming `where` and the value."""
    out = {"policy": given.get("policy", defaults["policy"]), "steps": given.get("steps", defaults["steps"]),
           **{key: float(given.get(key, defaults[key])) for key in ("threshold", "entropy_bound", "eps", "alg_temp")}}
    if out["policy"] not in POLICIES:
        raise ValueError(f"DareMegaDecoding ({where}): policy={out['policy']!r}; expected one of {', '.join(POLICIES)}")
    if out["steps"] is not None:
        out["steps"] = int(out["steps"])
    try:
        SamplingParams(**out).check()
    except Exception as e:  # noqa: BLE001 - ConfigError's message, under SGLang's own error type
        raise ValueError(f"DareMegaDecoding ({where}): {e}") from None
    return out


def settings(algorithm_config: dict, mask_id: int) -> dict:
    """The unmasking settings and the model's mask id from the server's algorithm config; a bad key or value
    stops the server at start-up."""
    known = {"block_size", "mask_id", *UNMASKING}
    unknown = sorted(set(algorithm_config) - known)
    if unknown:
        raise ValueError(f"DareMegaDecoding: unknown --dllm-algorithm-config keys {unknown}; known: {sorted(known)}")
    d = SamplingParams()
    defaults = {"policy": d.policy, "threshold": d.threshold, "entropy_bound": d.entropy_bound, "steps": None,
                "eps": d.eps, "alg_temp": d.alg_temp}
    return {"mask_id": int(algorithm_config.get("mask_id", mask_id)),
            **unmasking(algorithm_config, defaults, "--dllm-algorithm-config")}


class DareMegaDecoding(DllmAlgorithm):
    # SGLang hands the algorithm no request, only the batch; its scheduler validates each request in this same
    # process first (validate_request), which keeps the request's unmasking settings here, by request id
    claimed: "OrderedDict[str, dict]" = OrderedDict()

    def __init__(self, config):
        super().__init__(config)
        self.fill_id = config.mask_id  # what SGLang's scheduler writes into new blocks (self.mask_id too)
        options = settings(dict(config.algorithm_config or {}), config.mask_id)
        self.model_mask_id = options.pop("mask_id")
        self.options = options
        self.batch_steps = self.block_size  # the most steps a block of the current batch may take

    @classmethod
    def validate_request(cls, req) -> str | None:
        claim = ((req.sampling_params.custom_params or {}).get(CLAIM)) or {}
        config = req.dllm_config
        served = {"block_size": config.block_size,
                  "mask_id": int((config.algorithm_config or {}).get("mask_id", config.mask_id))}
        wrong = [f"{k}={claim[k]} (the trainer's model) but the server decodes with {k}={served[k]}"
                 for k in ("block_size", "mask_id") if k in claim and int(claim[k]) != served[k]]
        if wrong:
            return "DareMegaDecoding: " + "; ".join(wrong) + " (--dllm-algorithm-config)"
        unknown = sorted(set(claim) - {"block_size", "mask_id", *UNMASKING})
        if unknown:
            return f"DareMegaDecoding: unknown custom_params.{CLAIM} keys {unknown}"
        given = {k: claim[k] for k in UNMASKING if k in claim}
        try:
            unmasking(given, {"policy": "low_confidence_dynamic", "threshold": 0.0, "entropy_bound": 1.0,
                              "steps": None, "eps": 1e-3, "alg_temp": 0.0}, f"custom_params.{CLAIM}")
        except ValueError as e:
            return str(e)
        if req.sampling_params.min_p or req.sampling_params.repetition_penalty != 1.0:
            return "DareMegaDecoding samples with temperature, top_p and top_k only (min_p / penalties unsupported)"
        if given and getattr(req, "rid", None) is not None:
            cls.claimed[req.rid] = given
            while len(cls.claimed) > REQUESTS_KEPT:
                cls.claimed.popitem(last=False)
        return None

    def max_steps(self, block_size: int) -> int:
        # the last step reveals what is left; one more call reports the block done
        return self.batch_steps + 1

    # ---- the block loop's hooks -----------------------------------------------------------------------
    def _blocks(self, forward_batch) -> torch.Tensor:
        return forward_batch.input_ids.view(forward_batch.batch_size, self.block_size)

    def _prompt(self, forward_batch) -> torch.Tensor:
        """The block's committed positions: SGLang's prompt mask when it sends one (a prompt holding the mask
        id literally), else every position that holds neither SGLang's fill id nor the model's mask id."""
        if forward_batch.dllm_prompt_mask is not None:
            return forward_batch.dllm_prompt_mask.bool()
        blocks = self._blocks(forward_batch)
        return (blocks != self.fill_id) & (blocks != self.model_mask_id)

    def prepare_inputs(self, model_runner, forward_batch, states) -> None:
        if self.fill_id != self.model_mask_id:  # the model sees its own mask token, never SGLang's
            blocks = self._blocks(forward_batch)
            blocks.masked_fill_(blocks == self.fill_id, self.model_mask_id)

    def init_step_state(self, forward_batch) -> list:
        """Per request of the batch: its block's generator (request seed, block index), its unmasking settings
        and sampling parameters, the step counter."""
        prompt = self._prompt(forward_batch)
        batch = forward_batch.batch_size
        rids = forward_batch.rids or [str(i) for i in range(batch)]
        starts = forward_batch.positions.view(batch, self.block_size)[:, 0].tolist()
        states = []
        for i in range(batch):
            options = unmasking(self.claimed.get(rids[i], {}), self.options, "request")
            options["steps"] = options["steps"] or self.block_size
            params = self._params(forward_batch.sampling_info, i, options)
            states.append({"step": 0, "initially_masked": int((~prompt[i]).sum()), "params": params,
                           "generator": block_generator(request_seed(rids[i]), int(starts[i]) // self.block_size)})
        self.batch_steps = max([self.block_size] + [s["params"].steps for s in states])
        return states

    @staticmethod
    def _params(sampling_info, i: int, options: dict) -> SamplingParams:
        temperature = float(sampling_info.temperatures.view(-1)[i])
        top_k = int(sampling_info.top_ks.view(-1)[i])
        top_p = float(sampling_info.top_ps.view(-1)[i])
        if top_k == 1:  # SGLang's greedy
            temperature, top_k = 0.0, 0
        return SamplingParams(temperature=temperature, top_k=0 if top_k >= TOP_K_ALL else top_k, top_p=top_p,
                              **options)

    def step(self, forward_batch, full_logits: torch.Tensor, states: list) -> list[bool]:
        batch = forward_batch.batch_size
        logits = full_logits.view(batch, self.block_size, full_logits.shape[-1])
        blocks, prompt = self._blocks(forward_batch), self._prompt(forward_batch)
        done = []
        for i in range(batch):
            masked = (blocks[i] == self.model_mask_id) & ~prompt[i]
            if not masked.any():
                done.append(True)  # the forward that just ran wrote the finished block's keys and values
                continue
            state = states[i]
            params = state["params"]
            reveal, tokens, _ = denoise_step(logits[i].float(), blocks[i], self.model_mask_id, state["generator"],
                                             state["step"], params.steps, state["initially_masked"], params,
                                             prompt=prompt[i])
            blocks[i] = torch.where(reveal.to(blocks.device), tokens.to(blocks.device, blocks.dtype), blocks[i])
            state["step"] += 1
            done.append(False)
        return done

