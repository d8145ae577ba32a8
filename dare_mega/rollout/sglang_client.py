"""A thin HTTP client for one SGLang server (sglang 0.5.23's documented routes; docs/scaling.md).

Every call names the route and the server in its error. Weight updates follow the server's session rule:
pause_generation -> begin_weight_update -> update_weights_from_* (one or more) -> end_weight_update ->
continue_generation; update_weights_from_disk needs no session. The weight version is a string on the server
(`/model_info`'s weight_version, and each /generate answer's meta_info.weight_version).
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from dare_mega.errors import DareMegaError


class SGLangError(DareMegaError):
    """A route answered with an error, or the server could not be reached."""


@dataclass
class SGLangClient:
    url: str  # e.g. http://10.0.0.5:30000
    timeout: float = 600.0
    api_key: str | None = None

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        self.session = requests.Session()
        if self.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.api_key}"

    # ---- plumbing --------------------------------------------------------------------------------------
    def _call(self, method: str, route: str, body: dict | None = None, timeout: float | None = None,
              params: dict | None = None, expect_json: bool = True):
        try:
            response = self.session.request(method, f"{self.url}{route}", json=body, params=params,
                                            timeout=timeout or self.timeout)
        except requests.RequestException as e:
            raise SGLangError(f"{self.url}{route}: {type(e).__name__}: {e}") from e
        data = None
        if expect_json:
            try:
                data = response.json()
            except ValueError:
                data = None
        if response.status_code >= 400:
            message = _message(data) or response.text[:500]
            raise SGLangError(f"{self.url}{route}: HTTP {response.status_code}: {message}")
        if isinstance(data, dict) and data.get("success") is False:
            raise SGLangError(f"{self.url}{route}: {data.get('message')}")
        return data if expect_json else response.text

    # ---- health and state ------------------------------------------------------------------------------
    def healthy(self, timeout: float = 30.0) -> bool:
        try:
            return self.session.get(f"{self.url}/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def model_info(self) -> dict:
        return self._call("GET", "/model_info")

    def weight_version(self) -> str:
        return str(self.model_info()["weight_version"])

    def server_info(self) -> dict:
        """The server's resolved arguments (model_path, tp_size, dllm_algorithm, dllm_algorithm_config, ...)."""
        return self._call("GET", "/server_info")

    # ---- generation -----------------------------------------------------------------------------------
    def generate(self, input_ids: list[list[int]], sampling_params: list[dict] | dict, return_logprob: bool = False,
                 rids: list[str] | None = None) -> list[dict]:
        """A batch of token-id prompts; returns one {"text", "output_ids", "meta_info"} per prompt, in order."""
        body = {"input_ids": input_ids, "sampling_params": sampling_params, "return_logprob": return_logprob}
        if rids is not None:
            body["rid"] = rids
        out = self._call("POST", "/generate", body)
        return out if isinstance(out, list) else [out]

    # ---- weight updates -------------------------------------------------------------------------------
    def flush_cache(self, timeout: float = 0.0) -> None:
        self._call("POST", "/flush_cache", params={"timeout": timeout} if timeout else None, expect_json=False)

    def pause_generation(self, mode: str = "retract") -> None:
        self._call("POST", "/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self._call("POST", "/continue_generation", {})

    def begin_weight_update(self) -> None:
        self._call("POST", "/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self._call("POST", "/end_weight_update", {})

    def update_weights_from_tensor(self, serialized_per_rank: list[str], load_format: str | None = "flattened_bucket",
                                   weight_version: str | None = None, flush_cache: bool = False) -> None:
        self._call("POST", "/update_weights_from_tensor", {
            "serialized_named_tensors": serialized_per_rank, "load_format": load_format, "flush_cache": flush_cache,
            "weight_version": weight_version})

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> None:
        self._call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._call("POST", "/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, load_format: str | None = "flattened_bucket",
                                        weight_version: str | None = None, flush_cache: bool = False) -> None:
        self._call("POST", "/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name, "load_format": load_format,
            "weight_version": weight_version, "flush_cache": flush_cache})

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        self._call("POST", "/update_weights_from_disk", {"model_path": model_path, "weight_version": weight_version})

    def weights_checker(self, action: str) -> dict:
        """SGLang's weight checker over the engine's own parameters: snapshot (a host copy), reset_tensors (every
        parameter random), compare (every parameter equal to the snapshot, else HTTP 400 naming the tensors),
        checksum (per-tensor hashes of each TP rank's shard)."""
        return self._call("POST", "/weights_checker", {"action": action})


def _message(data) -> str | None:
    if isinstance(data, dict) and isinstance(data.get("detail"), list):  # FastAPI's 422: the body's bad fields
        return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in data["detail"])
    if isinstance(data, dict):
        if isinstance(data.get("error"), dict):
            return data["error"].get("message")
        return data.get("message") or data.get("error")
    return None
