"""Block-diffusion masks: the per-token rule against the BD3 definition, and their effect through the model."""

import pytest
import torch

from dare_mega.diffusion.attention import attend
from dare_mega.diffusion.masks import (
    causal_mask,
    inference_mask,
    packed_position_ids,
    two_stream_inputs,
    two_stream_mask,
)


def bd3_reference(n: int, block: int) -> torch.Tensor:
    """SDAR's training mask for one sample of n tokens, [2n, 2n], written out from its three parts."""
    size = 2 * n
    allowed = torch.zeros(size, size, dtype=torch.bool)
    for q in range(size):
        for k in range(size):
            q_clean, k_clean = q >= n, k >= n
            q_blk, k_blk = (q - n * q_clean) // block, (k - n * k_clean) // block
            block_diagonal = q_blk == k_blk and q_clean == k_clean
            offset_block_causal = (not q_clean) and k_clean and k_blk < q_blk
            block_causal = q_clean and k_clean and k_blk <= q_blk
            allowed[q, k] = block_diagonal or offset_block_causal or block_causal
    return allowed


@pytest.mark.parametrize("n,block", [(8, 4), (12, 4), (10, 4), (16, 8), (6, 1)])
def test_two_stream_mask_is_bd3(n, block):
    positions = torch.arange(n)[None]
    assert torch.equal(two_stream_mask(positions, block).dense()[0, 0], bd3_reference(n, block))


def test_packed_samples_are_kept_apart():
    positions = packed_position_ids([[6, 10]], 16)
    dense = two_stream_mask(positions, 4).dense()[0, 0]
    first = torch.cat([torch.arange(6), 16 + torch.arange(6)])
    second = torch.cat([6 + torch.arange(10), 22 + torch.arange(10)])
    assert not dense[first][:, second].any() and not dense[second][:, first].any()
    # inside each sample the mask is that sample's own BD3 mask (its block grid starts at its position 0)
    assert torch.equal(dense[first][:, first], bd3_reference(6, 4))
    assert torch.equal(dense[second][:, second], bd3_reference(10, 4))


def test_inference_mask_is_block_causal_and_causal_is_token_causal():
    positions = torch.arange(8)[None]
    blocks = torch.arange(8) // 4
    assert torch.equal(inference_mask(positions, 4).dense()[0, 0], blocks[None, :] <= blocks[:, None])
    assert torch.equal(causal_mask(positions).dense()[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())


def test_pack_padding_forms_its_own_sample():
    positions = packed_position_ids([[5]], 8)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    dense = inference_mask(positions, 4).dense()[0, 0]
    assert not dense[5:, :5].any() and not dense[:5, 5:].any()


def test_two_stream_inputs_share_positions():
    clean = torch.tensor([[5, 6, 7, 8]])
    noisy = torch.tensor([[9, 6, 9, 8]])
    ids, pos = two_stream_inputs(noisy, clean, torch.arange(4)[None])
    assert ids.tolist() == [[9, 6, 9, 8, 5, 6, 7, 8]]
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="one shape"):
        two_stream_inputs(noisy, clean[:, :3], torch.arange(4)[None])


@pytest.mark.parametrize("kind", ["two-stream", "inference"])
def test_flex_and_sdpa_agree(kind):
    positions = packed_position_ids([[10, 22], [32]], 32)
    mask = two_stream_mask(positions, 4) if kind == "two-stream" else inference_mask(positions, 4)
    g = torch.Generator().manual_seed(0)
    b, s = mask.batch_size, mask.q_len
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU: the compiled FlexAttention kernel
    mask = mask.to(device)
    q, k, v = (torch.randn(b, h, s, 16, generator=g).to(device) for h in (4, 2, 2))
    sdpa = attend(q, k, v, mask, 0.25, "sdpa")
    flex = attend(q, k, v, mask, 0.25, "flex")
    assert (sdpa - flex).abs().max().item() <= 1e-5
    # and the mask matters: without it the output is different
    assert (sdpa - attend(q, k, v, None, 0.25, "sdpa")).abs().max().item() > 1e-2


# ---- through the Megatron model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_model(tiny_dir, world1):
    from dare_mega.models.builder import build_from_hf
    from dare_mega.parallel import ParallelLayout

    chunks, args = build_from_hf(tiny_dir["sdar"], ParallelLayout())
    chunks[0].eval()
    return chunks[0], args


def _logits(model, args, noisy, clean, positions):
    ids, pos = two_stream_inputs(noisy, clean, positions)
    device = next(model.parameters()).device
    mask = two_stream_mask(positions, args.diffusion.block_size).to(device)
    with torch.no_grad():
        return model(ids.to(device), pos.to(device), mask)[..., : args.vocab_size].cpu()


def _changed_blocks(before, after, n, block):
    """(noisy blocks, clean blocks) whose logits changed, for one sample of n tokens."""
    diff = (before - after).abs().amax(-1)[0]
    noisy = {i // block for i in range(n) if diff[i] > 1e-6}
    clean = {i // block for i in range(n) if diff[n + i] > 1e-6}
    return noisy, clean


def test_perturbing_a_noisy_token_changes_only_its_block(dense_model):
    model, args = dense_model
    n, block = 16, args.diffusion.block_size
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 256, (1, n), generator=g)
    noisy = clean.clone()
    noisy[0, ::2] = args.diffusion.mask_token_id
    positions = torch.arange(n)[None]
    base = _logits(model, args, noisy, clean, positions)
    for pos in (1, 6, 13):
        changed = noisy.clone()
        changed[0, pos] = (changed[0, pos] + 7) % 256
        noisy_blocks, clean_blocks = _changed_blocks(base, _logits(model, args, changed, clean, positions), n, block)
        assert noisy_blocks == {pos // block}, f"noisy token {pos}: noisy blocks {noisy_blocks} changed"
        assert clean_blocks == set(), f"noisy token {pos}: clean blocks {clean_blocks} changed"


def test_perturbing_a_clean_token_changes_later_blocks_only(dense_model):
    model, args = dense_model
    n, block = 16, args.diffusion.block_size
    num_blocks = n // block
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 256, (1, n), generator=g)
    noisy = clean.clone()
    noisy[0, 1::3] = args.diffusion.mask_token_id
    positions = torch.arange(n)[None]
    base = _logits(model, args, noisy, clean, positions)
    for pos in (2, 5, 15):
        changed = clean.clone()
        changed[0, pos] = (changed[0, pos] + 11) % 256
        j = pos // block
        noisy_blocks, clean_blocks = _changed_blocks(base, _logits(model, args, noisy, changed, positions), n, block)
        assert clean_blocks == set(range(j, num_blocks)), f"clean token {pos}: clean blocks {clean_blocks}"
        assert noisy_blocks == set(range(j + 1, num_blocks)), f"clean token {pos}: noisy blocks {noisy_blocks}"


def test_packed_sample_is_untouched_by_its_neighbour(dense_model):
    model, args = dense_model
    positions = packed_position_ids([[8, 8]], 16)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 256, (1, 16), generator=g)
    noisy = clean.clone()
    noisy[0, ::2] = args.diffusion.mask_token_id
    base = _logits(model, args, noisy, clean, positions)
    changed = clean.clone()
    changed[0, 0:8] = (changed[0, 0:8] + 3) % 256  # every clean token of the first sample
    other = _logits(model, args, noisy, changed, positions)
    second = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
    assert (base[0, second] - other[0, second]).abs().max().item() == 0.0
    # the second sample sits at positions 0..7 again: same tokens there give the same logits as alone
    alone = _logits(model, args, noisy[:, 8:], clean[:, 8:], torch.arange(8)[None])
    assert (alone[0] - base[0, second]).abs().max().item() <= 1e-5
