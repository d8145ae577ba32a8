"""Memory for colocated RL: the trainer's optimizer state and gradients off the device during the rollout
(train.offload), and activation recomputation (train.recompute): same numbers, fewer bytes."""

import pytest
import torch
from conftest import saved_activation_bytes

from dare_mega.algorithms.sft import objective, sft_batch
from dare_mega.data.sft import Sample, pack
from dare_mega.trainer.config import SFTConfig


def _trainer(hf_dir, dtype, recompute=None):
    from dare_mega.models.builder import build_from_hf
    from dare_mega.models.runner import Runner, wrap_for_training
    from dare_mega.models.transformer_config import RuntimeOptions
    from dare_mega.parallel import ParallelLayout
    from dare_mega.trainer.setup import build_optimizer

    chunks, args = build_from_hf(hf_dir, ParallelLayout(), RuntimeOptions(params_dtype=dtype,
                                                                         recompute_granularity=recompute))
    chunks = wrap_for_training(chunks, distributed_optimizer=True)
    cfg = SFTConfig()
    cfg.optim.lr = 1e-2
    optimizer, _ = build_optimizer(cfg, chunks, dtype)
    return chunks, args, optimizer, Runner(chunks, args)


def _batch(args, seed):
    samples = [Sample([(seed * 7 + 3 * i) % 200 + 5 for i in range(20)], prompt_len=6),
               Sample([(seed * 11 + 5 * i) % 200 + 5 for i in range(12)], prompt_len=4)]
    rows, _ = pack(samples, budget=32)
    obj = objective("sdar_block", args.family)
    return sft_batch(rows, obj, args.diffusion.mask_token_id, args.diffusion.block_size,
                     [torch.Generator().manual_seed(seed)])


def _step(runner, optimizer, args, seed):
    optimizer.zero_grad()
    loss = runner.loss_and_grads(_batch(args, seed), micro_batch_size=1)
    ok, _, _ = optimizer.step()
    assert ok
    return loss


def _weights(chunks):
    return {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offload_round_trip_steps_bitwise_alike_and_frees_the_optimizer_state(tiny_dir, world1, dtype):
    from dare_mega.trainer.offload import TrainerOffload

    runs = []
    for offload in (False, True):
        chunks, args, optimizer, runner = _trainer(tiny_dir["sdar_moe"], dtype)
        _step(runner, optimizer, args, 1)  # Adam's moments exist from the first step on
        keeper = TrainerOffload(chunks, optimizer)
        before = keeper.device_bytes()
        if offload:
            keeper.offload()
            during = keeper.device_bytes()
            # what a rollout does meanwhile: forwards on the parameters, which stay
            with torch.no_grad():
                batch = _batch(args, 9)
                chunks[0](batch.input_ids, batch.position_ids, batch.mask)
            keeper.reload()
            assert keeper.device_bytes() == before
        losses = [_step(runner, optimizer, args, 2), _step(runner, optimizer, args, 3)]
        runs.append((before, during if offload else None, losses, _weights(chunks), optimizer))

    (before, _, losses_a, weights_a, optimizer), (_, during, losses_b, weights_b, _) = runs
    assert losses_a == losses_b
    for name, w in weights_a.items():
        assert torch.equal(w, weights_b[name]), name
    # the optimizer state counted tensor by tensor: Adam's two moments per main parameter, and for bf16 the
    # fp32 main parameters themselves (fp32 models update the parameter buffer in place: nothing extra)
    main = [p for part in optimizer.chained_optimizers for g in part.optimizer.param_groups for p in g["params"]]
    moments = sum(2 * p.numel() * 4 for p in main)
    expected = moments + (sum(p.numel() * 4 for p in main) if dtype == torch.bfloat16 else 0)
    assert before["optimizer_state"] == expected
    assert before["gradients"] > 0
    assert during == {"optimizer_state": 0, "gradients": 0}


def test_recompute_gives_the_same_gradients_and_keeps_fewer_activations(tiny_dir, world1):
    results = {}
    for granularity in (None, "selective", "full"):
        chunks, args, optimizer, runner = _trainer(tiny_dir["sdar_moe"], torch.float32, granularity)
        batch = _batch(args, 4)
        model = chunks[0].module
        saved = saved_activation_bytes(model, lambda: model(batch.input_ids, batch.position_ids, batch.mask))
        loss = runner.loss_and_grads(batch, micro_batch_size=1)
        grads = {n: p.main_grad.clone() for n, p in chunks[0].named_parameters()}
        results[granularity] = (saved, loss, grads)
    base_saved, base_loss, base_grads = results[None]
    for granularity in ("selective", "full"):
        saved, loss, grads = results[granularity]
        assert loss == base_loss, granularity
        for name, g in base_grads.items():
            assert torch.equal(g, grads[name]), (granularity, name)
    assert results["full"][0] < results["selective"][0] < base_saved
    assert results["full"][0] < base_saved / 10  # each layer keeps its input only


def test_routing_replay_with_recompute_is_refused_by_name():
    from dare_mega.config import load_config
    from dare_mega.errors import ConfigError
    from dare_mega.trainer.config import RLConfig

    with pytest.raises(ConfigError, match=r"routing_replay=rollout with train\.recompute=full"):
        load_config(RLConfig, None, ["algorithm.routing_replay=rollout", "train.recompute=full"])
