"""The small SDAR-MoE shape the CPU benchmarks share (4 layers, hidden 256, 8 experts, top-2), with overrides."""


def small_sdar_moe(**overrides) -> dict:
    from dare_mega.models.presets import load_preset

    cfg = load_preset("tiny-sdar-moe")
    cfg.update(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
               num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
               max_position_embeddings=4096)
    cfg.update(overrides)
    return cfg
