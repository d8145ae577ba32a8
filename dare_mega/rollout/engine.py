"""The native block-diffusion rollout engine: one machine, CPU or GPU, no server.

Decoding, per request, on the block grid of the family (from position 0 of the prompt; the prompt's last
partial block is the head of the first decoded block and stays fixed):

  prefill   the prompt's full blocks, once, block-causal, writing the KV cache;
  denoise   up to `steps` forwards of the current block: it sees the cache and itself, writes nothing;
            each forward samples every position and the policy reveals some masked ones;
  commit    one forward of the finished block, writing its keys and values (skipped when the request stops).

All active requests move together, one forward per iteration, each at its own block: a request in its
denoising phase and one committing share the forward (only the committing rows write the cache).
Requests of different lengths batch together; finished ones leave the batch. `cache=False` recomputes the
whole sequence every step instead (same tokens and log-probs; for checking and benchmarks).
"""

from __future__ import annotations

import torch

from dare_mega.data.tokenizer import load_tokenizer
from dare_mega.diffusion.kv_cache import CachedBlocks
from dare_mega.errors import ConfigError
from dare_mega.rollout.decoder import BlockDecoder
from dare_mega.rollout.model import InferenceModel


class NativeEngine(BlockDecoder):
    """generate(prompts, params) -> completions with trajectories (rollout/decoder.py), on a plain-PyTorch copy
    of the model (rollout/model.py) with a block KV cache; load_weights(named tensors, version)."""

    supports_cache = True
    supports_device_loop = True

    def __init__(self, model: InferenceModel, table, tokenizer=None, device="cpu"):
        super().__init__(model.args, tokenizer, device)
        self.model = model
        self.table = table
        self._hf_owner = {name: b for b in table.bindings() for name in b.hf_names}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    # ---- construction and weights ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | None = None,
                        tokenizer: bool = True) -> "NativeEngine":
        """From an HF checkpoint directory, or a dare_mega torch_dist checkpoint directory."""
        import os

        from dare_mega.models.builder import load_model_args, mapping_for
        from dare_mega.models.hf_loader import check_hf_checkpoint
        from dare_mega.models.weight_mapping import LayoutContext

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if os.path.exists(os.path.join(path, "dare_mega.json")):
            from dare_mega.checkpoint.torch_dist import ASSETS_DIR, TorchDistReader, args_of, key_for_canonical

            args = args_of(path)
            table = mapping_for(args)
            model = InferenceModel(args, dtype, device)
            reader = TorchDistReader(path)
            ctx = LayoutContext.of(args)
            for binding in table.bindings():
                key, expert = key_for_canonical(binding.megatron_name)
                model.set_full(binding.megatron_name, binding.row.unpad(reader.read(key, expert), ctx))
            assets = os.path.join(path, ASSETS_DIR)
        else:
            args = load_model_args(path)
            table = mapping_for(args)
            model = InferenceModel(args, dtype, device)
            model.load_from_reader(table, check_hf_checkpoint(args, path, table))
            assets = path
        return cls(model, table, load_tokenizer(assets) if tokenizer else None, device)

    def load_weights(self, named_tensors, version: int | None = None) -> int:
        """Update weights from (HF name, tensor) pairs, e.g. a bucket of the trainer's weight sync. Tensors
        that together form one Megatron tensor (q, k, v; gate, up) are applied once all have arrived. The
        weight version changes only when `version` is given (the sync's last bucket)."""
        from dare_mega.models.weight_mapping import LayoutContext

        ctx = LayoutContext.of(self.args)
        applied = 0
        for name, tensor in named_tensors:
            binding = self._hf_owner.get(name)
            if binding is None:
                raise ConfigError(f"load_weights: {name!r} is not a tensor of {self.args.architecture}")
            parts = self._pending.setdefault(binding.megatron_name, {})
            parts[name] = tensor
            if len(parts) == len(binding.hf_names):
                full = binding.row.to_megatron([parts[n] for n in binding.hf_names], ctx)
                self.model.set_full(binding.megatron_name, full)
                del self._pending[binding.megatron_name]
                applied += 1
        if version is not None:
            self.weight_version = version
        return applied

    def routed_experts(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                       chunk: int = 8) -> dict[int, torch.Tensor]:
        """The experts this engine routes each token of a batch to: {layer: [B, S, topk]}; `mask` is the dense
        boolean attention mask [B, 1 or none, S, S] (the trainer's rows, to compare with its own routing)."""
        mask = mask.reshape(mask.shape[0], mask.shape[-2], mask.shape[-1])
        out: dict[int, list[torch.Tensor]] = {}
        for start in range(0, input_ids.shape[0], chunk):
            rows = slice(start, start + chunk)
            self.model.routing_record = {}
            try:
                dev = self.model.device
                self.model(input_ids[rows].to(dev), position_ids[rows].to(dev), mask[rows].to(dev), logits=False)
                for layer, chosen in self.model.routing_record.items():
                    out.setdefault(layer, []).append(chosen)
            finally:
                self.model.routing_record = None
        return {layer: torch.cat(parts) for layer, parts in out.items()}

    # ---- the model, with and without the cache ---------------------------------------------------------
    def _block_logits(self, tokens, positions, mask, starts, width):
        dev = self.device
        return self.model(tokens.to(dev), positions.to(dev), mask.to(dev), window=(starts.to(dev), width)).cpu()

    def _device_cached_forward(self, cache, rows, lengths, tokens, positions, write, span):
        block = tokens.shape[1]
        among = torch.ones(tokens.shape[0], block, block, dtype=torch.bool, device=tokens.device)
        cached = CachedBlocks(cache, rows, lengths, positions, among, write, span=span, static=True)
        return self.model(tokens, positions, among, cached=cached)

    def _cached_forward(self, cache, slots, lengths, tokens, positions, new_mask, write, logits, starts=None,
                        width=None, replaced=None):
        dev = self.device
        cached = CachedBlocks(cache, torch.tensor(slots), lengths, positions, new_mask, write,
                              replaced=replaced).to(dev)
        # with `starts`, only the window's logits are computed (masked diffusion feeds whole canvases)
        out = self.model(tokens.to(dev), positions.to(dev), new_mask.to(dev), cached=cached, logits=logits,
                         window=None if starts is None else (starts.to(dev), width))
        return None if out is None else out.cpu()
