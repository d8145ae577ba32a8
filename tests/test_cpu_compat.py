"""The CPU compatibility layer: each redirect still needed by this Megatron-Core, each doing its job."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from dare_mega.parallel import cpu_compat


@pytest.fixture(scope="module", autouse=True)
def applied():
    assert cpu_compat.apply(), "the redirects must be active on a machine without CUDA"


@pytest.mark.parametrize("redirect", cpu_compat.REDIRECTS, ids=lambda r: r.name)
def test_megatron_still_needs_each_redirect(redirect):
    """Fails when a Megatron-Core release drops the CUDA assumption a redirect works around."""
    assert redirect.reason and len(redirect.reason) < 300
    assert redirect.still_needed(), f"{redirect.name}: Megatron-Core no longer needs this redirect; remove it"


def test_apply_is_idempotent_and_only_without_cuda():
    assert cpu_compat.apply() and cpu_compat.applied()
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "from dare_mega.parallel import cpu_compat\n"
        "original = torch.cuda.current_device\n"
        "assert cpu_compat.apply() is False and not cpu_compat.applied()\n"
        "assert torch.cuda.current_device is original\n"
        "print('untouched')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "untouched" in out.stdout, out.stderr[-2000:]


def test_device_stream_and_rng_redirects():
    assert torch.cuda.current_device() == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    stream.record_event().synchronize()
    torch.cuda.synchronize()
    torch.cuda.manual_seed(7)
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_rng_tracker_forks_the_cpu_generator(world1):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is restored
    with tracker.fork():
        assert not torch.equal(torch.rand(4), inside)  # the tracked stream advanced


def test_factories_and_tensor_cuda():
    from megatron.core.pipeline_parallel import schedules

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # everything else passes through
    t = torch.ones(2)
    assert t.cuda() is t


def test_split_sizes_become_numpy_like_on_gpus():
    from megatron.core.transformer.moe import token_dispatcher

    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [1, 2]
    t = torch.tensor([3])
    assert token_dispatcher.maybe_move_tensor_to_cpu(t) is t


def test_te_general_gemm_defined():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


def test_type_strings_only_inside_megatron_checks():
    p = torch.nn.Parameter(torch.zeros(2))
    assert p.type() == "torch.FloatTensor"
    with cpu_compat._cuda_type_names():
        assert p.type() == "torch.cuda.FloatTensor"
        assert p.type(torch.float64).dtype == torch.float64
    assert p.type() == "torch.FloatTensor"
    import inspect

    from megatron.core.optimizer import distrib_optimizer

    raw = inspect.getattr_static(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups")
    assert isinstance(raw, classmethod) and getattr(raw.__func__, "__dare_mega_wrapped__", False)
