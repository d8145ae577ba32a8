"""Megatron-Core on a machine without CUDA: the few process-local CUDA assumptions, redirected to the CPU.

Applied once, by `apply()`, only when `torch.cuda.is_available()` is False. Each redirect changes where a
tensor lives or replaces a CUDA-only no-op (streams, events); none changes the parallel arithmetic, which stays
Megatron-Core's own. `REDIRECTS` lists them with a one-line reason and a probe that says whether the upstream
code still holds the assumption; tests/test_cpu_compat.py fails when a new Megatron-Core release makes one of
them unnecessary or wrong.

The sequence-parallel RMSNorm (the fifth item of ../shared/reference/megatron_core_on_cpu.md) is not a
redirect: without Transformer Engine, dare_mega's layer spec uses its own RMSNorm, whose arithmetic is right
on GPUs as well (dare_mega/models/spec.py); with it, TENorm.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

_APPLIED = False

# Factories that take a `device=` keyword; Megatron calls some of them with device="cuda".
_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like",
)

# Megatron-Core modules that allocate with a hard-coded device="cuda" (redirect 8).
_CUDA_FACTORY_MODULES = (
    "megatron.core.rerun_state_machine",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CpuTorch:
    """Stands in for the `torch` module inside one Megatron module: factories asked for "cuda" get "cpu"."""

    def __init__(self, real_torch):
        self._torch = real_torch

    def __getattr__(self, name):
        attr = getattr(self._torch, name)
        if name not in _FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
            return attr(*args, **kwargs)

        return factory


class _NoStream:
    """A CUDA stream or event that has nothing to order on a CPU: every operation is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoStream)

    def __hash__(self):
        return 0


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def _no_stream_context(*args, **kwargs):
    yield


# ----------------------------------------------------------------------------------------------------------
# The redirects. Each `_redirect_*` does one thing; each `_probe_*` reads Megatron's source (not the patched
# objects) and returns True while Megatron still holds the assumption.


def _redirect_current_device():
    torch.cuda.current_device = lambda: "cpu"


def _probe_current_device() -> bool:
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    return "torch.cuda.current_device()" in inspect.getsource(rotary_pos_embedding)


def _redirect_streams():
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.default_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = _no_stream_context
    torch.cuda.synchronize = _noop
    torch.Tensor.record_stream = lambda self, stream: None


def _probe_streams() -> bool:
    from megatron.core.transformer.moe import token_dispatcher

    return "torch.cuda.Stream()" in inspect.getsource(token_dispatcher)


def _redirect_rng():
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # not torch.manual_seed: that calls torch.cuda.manual_seed_all, which must stay the lazy no-op it is
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)


def _probe_rng() -> bool:
    from megatron.core.tensor_parallel import random as tp_random

    return "torch.cuda.default_generators" in inspect.getsource(tp_random)


def _redirect_te_general_gemm():
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _probe_te_general_gemm() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return "te_general_gemm is not None" in inspect.getsource(moe_utils) and (
        not hasattr(moe_utils, "te_general_gemm") or moe_utils.te_general_gemm is None
    )


def _redirect_split_sizes():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _probe_split_sizes() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return "tensor.is_cuda" in inspect.getsource(moe_utils.maybe_move_tensor_to_cpu)


def _redirect_uneven_gather():
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) == 1:
            return original_gather(input_, group, None, use_global_buffer)
        # gloo has no uneven all_gather: pad every piece to the largest, gather, then drop the padding.
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = original_gather(padded, group, None, False)
        pieces = gathered.split(largest, dim=0)
        return torch.cat([p[:n] for p, n in zip(pieces, output_split_sizes)], dim=0)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or len(set(input_split_sizes)) == 1:
            return original_reduce_scatter(input_, group, None, use_global_buffer)
        # gloo has no uneven reduce_scatter: all-reduce the whole tensor and keep this rank's rows.
        reduced = input_.clone()
        torch.distributed.all_reduce(reduced, group=group)
        rank = group.rank()
        start = sum(input_split_sizes[:rank])
        return reduced[start : start + input_split_sizes[rank]].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


def _probe_uneven_gather() -> bool:
    from megatron.core.tensor_parallel import mappings

    return "torch.distributed.all_gather(output_tensor_list" in inspect.getsource(mappings)


def _redirect_cuda_factories():
    for name in _CUDA_FACTORY_MODULES:
        module = importlib.import_module(name)
        if isinstance(module.torch, _CpuTorch):
            continue
        module.torch = _CpuTorch(module.torch)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _probe_cuda_factories() -> bool:
    from megatron.core.pipeline_parallel import schedules

    return 'device="cuda"' in inspect.getsource(schedules)


@contextlib.contextmanager
def _cuda_type_names():
    """While active, CPU float tensors answer `.type()` with the CUDA name Megatron's optimizer checks for."""
    original = torch.Tensor.type
    cuda_names = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return cuda_names.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapped.__dare_mega_wrapped__ = True
    return wrapped


_TYPE_CHECKED = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "_build_model_and_main_param_groups"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
)
# modules that import those functions by name, and so keep the unwrapped ones unless rebound
_IMPORTED_BY_NAME = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.layer_wise_optimizer")


def _redirect_type_strings():
    for module_name, class_name, fn_name in _TYPE_CHECKED:
        module = importlib.import_module(module_name)
        owner = getattr(module, class_name) if class_name else module
        raw = inspect.getattr_static(owner, fn_name)
        if isinstance(raw, (staticmethod, classmethod)):
            if getattr(raw.__func__, "__dare_mega_wrapped__", False):
                continue
            setattr(owner, fn_name, type(raw)(_with_cuda_type_names(raw.__func__)))
        else:
            if getattr(raw, "__dare_mega_wrapped__", False):
                continue
            setattr(owner, fn_name, _with_cuda_type_names(raw))
    from megatron.core.optimizer import clip_grads

    for module_name in _IMPORTED_BY_NAME:
        module = importlib.import_module(module_name)
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


def _probe_type_strings() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return "'torch.cuda.FloatTensor'" in inspect.getsource(distrib_optimizer)


@dataclass(frozen=True)
class Redirect:
    name: str
    reason: str
    apply: Callable[[], None]
    still_needed: Callable[[], bool]
    cpu_only: bool = True  # False: an upstream bug that GPUs without Transformer Engine hit too


REDIRECTS: tuple[Redirect, ...] = (
    Redirect("current_device", "buffers (TP gather, RoPE inv_freq, router, masks) are placed on "
             "torch.cuda.current_device(): answer 'cpu'", _redirect_current_device, _probe_current_device),
    Redirect("streams", "the alltoall dispatcher, DDP and parallel_state order work on CUDA streams and "
             "events, which have nothing to order on a CPU: no-op stand-ins", _redirect_streams, _probe_streams),
    Redirect("rng", "the tensor-parallel RNG tracker saves and restores the CUDA generator: track the CPU "
             "generator instead", _redirect_rng, _probe_rng),
    Redirect("te_general_gemm", "upstream bug: without Transformer Engine moe_utils never defines "
             "te_general_gemm and the router raises NameError: define it as None",
             _redirect_te_general_gemm, _probe_te_general_gemm, cpu_only=False),
    Redirect("split_sizes", "the alltoall dispatcher hands all_to_all_single a tensor of split sizes when "
             "it is already on the CPU: give it the numpy array it gets on GPUs",
             _redirect_split_sizes, _probe_split_sizes),
    Redirect("uneven_gather", "gloo cannot all_gather or reduce_scatter pieces of different sizes (NCCL "
             "can), needed with expert-tensor-parallel > 1: pad or all-reduce and slice",
             _redirect_uneven_gather, _probe_uneven_gather),
    Redirect("cuda_factories", "schedules, DDP buffers, optimizer, clip_grads, dist_checkpointing and utils "
             "allocate with device='cuda' or .cuda(): allocate on the CPU", _redirect_cuda_factories,
             _probe_cuda_factories),
    Redirect("type_strings", "the optimizers accept only 'torch.cuda.*Tensor' type strings: let CPU params "
             "answer with those names inside those checks", _redirect_type_strings, _probe_type_strings),
)


def needed() -> bool:
    return not torch.cuda.is_available()


def apply(force: bool = False) -> bool:
    """Apply every redirect once when CUDA is absent (or when `force`); fixes of upstream bugs that GPUs without
    Transformer Engine hit too (cpu_only=False) apply on every device. Returns whether the CPU redirects are active."""
    global _APPLIED
    if _APPLIED:
        return True
    for redirect in REDIRECTS:
        if not redirect.cpu_only:  # on every device (each apply is idempotent)
            redirect.apply()
    if not (force or needed()):
        return False
    for redirect in REDIRECTS:
        redirect.apply()
    _APPLIED = True
    return True


def applied() -> bool:
    return _APPLIED
