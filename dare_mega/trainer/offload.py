"""The trainer's optimizer state and gradient buffers off the accelerator while the rollout runs (train.offload).

Colocated RL decodes on the GPUs that train: during the rollout phase the Adam moments, the fp32 main parameters
of a bf16 model and the gradient buffers are dead weight. `offload()` copies each optimizer-state tensor into
host memory (pinned on CUDA) and frees its device storage (`untyped_storage().resize_(0)`: the tensor objects the
optimizer holds stay, so nothing has to be rebuilt); the gradient buffers are freed without a copy through
Megatron's own `_ParamAndGradBuffer.offload_to_cpu(move_params=False)` (they are zeroed before every step
anyway). `reload()` restores the bytes exactly, so a step after a round trip equals a step without one.

What stays: the model's parameters (the Megatron backend decodes on them, and weight sync reads them), and main
parameters that are views of the parameter buffer (fp32 models: Megatron's distributed optimizer then updates
the parameters in place).
"""

from __future__ import annotations

import torch


class TrainerOffload:
    def __init__(self, chunks, optimizer):
        self.chunks = chunks
        self.optimizer = optimizer
        self._host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (device tensor, host bytes)
        self.offloaded = False

    def _buffers(self):
        for chunk in self.chunks:
            yield from list(chunk.buffers) + list(chunk.expert_parallel_buffers)

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the optimizer state that has its own storage (one per storage)."""
        model = {b.param_data.untyped_storage().data_ptr() for b in self._buffers() if b.param_data is not None}
        seen, out = set(), []
        for part in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = part.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    candidates = [p] + [t for t in inner.state.get(p, {}).values() if torch.is_tensor(t)]
                    for t in candidates:
                        ptr = t.untyped_storage().data_ptr()
                        if t.dim() == 0 or ptr in model or ptr in seen or t.untyped_storage().nbytes() == 0:
                            continue  # scalars (Adam's step), views of the parameters, already taken
                        seen.add(ptr)
                        out.append(t)
        return out

    def device_bytes(self) -> dict[str, int]:
        """What the optimizer state and the gradient buffers occupy on the device now (their storages)."""
        state = sum(t.untyped_storage().nbytes() for t in self._state_tensors())
        grads = {b.grad_data.untyped_storage().data_ptr(): b.grad_data.untyped_storage().nbytes()
                 for b in self._buffers() if b.grad_data is not None}
        return {"optimizer_state": state, "gradients": sum(grads.values())}

    def offload(self) -> None:
        if self.offloaded:
            return
        pin = torch.cuda.is_available()
        for t in self._state_tensors():
            host = torch.empty(t.untyped_storage().nbytes(), dtype=torch.uint8, device="cpu", pin_memory=pin)
            host.copy_(torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()),
                       non_blocking=pin)
            self._host[id(t)] = (t, host)
        if pin:
            torch.cuda.synchronize()
        for t, _ in self._host.values():
            t.untyped_storage().resize_(0)
        for buffer in self._buffers():
            buffer.offload_to_cpu(move_params=False, move_grads=True)
        self.offloaded = True

    def reload(self) -> None:
        if not self.offloaded:
            return
        for buffer in self._buffers():
            buffer.reload_from_cpu(move_params=False, move_grads=True)
        for t, host in self._host.values():
            storage = t.untyped_storage()
            storage.resize_(host.numel())
            torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage).copy_(host, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._host.clear()
        self.offloaded = False
