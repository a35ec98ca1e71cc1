"""mlxft/mlx_lm_config.py on config dicts alone: a config in the older layout (top-level
rope_theta / rope_scaling, as transformers 4 wrote it) translates to what transformers 5's own
rewrite of it translates to, and what a shared folder may carry."""

from __future__ import annotations

import pytest

from mlxft.mlx_lm_config import UnmappableRope, for_shared_folder, mlx_lm_fields, translated_config

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, vocab_size=1000)
# the RoPE-related ModelArgs fields of mlx-lm's llama, qwen2, qwen3, gemma3_text and phi3
MLX_LM_READS = ("rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern",
                "partial_rotary_factor", "original_max_position_embeddings", "max_position_embeddings")
LEGACY = [
    ("llama", {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("llama", {"rope_theta": 2e5, "rope_scaling": {"type": "linear", "factor": 4.0}}),
    ("qwen2", {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 128}}),
    ("qwen3", {"rope_theta": 3e5, "head_dim": 16}),
    ("mistral", {"rope_theta": 1e6}),
    ("phi3", {"rope_theta": 1e4, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 128,
              "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0],
                               "long_factor": [2.0, 4.0, 8.0, 16.0]}}),
    ("gemma3_text", {"rope_theta": 5e5, "rope_local_base_freq": 2e4, "head_dim": 16, "num_hidden_layers": 6,
                     "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 3}),
]


@pytest.mark.parametrize("model_type, legacy", LEGACY, ids=[f"{t}-{i}" for i, (t, _) in enumerate(LEGACY)])
def test_older_layout_translates_as_transformers_reads_it(model_type, legacy):
    from transformers import AutoConfig

    config = {"model_type": model_type, **SIZES, **legacy}
    rewritten = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"}).to_dict()
    assert "rope_parameters" in rewritten
    ours, theirs = translated_config(config), translated_config(rewritten)
    assert {k: ours.get(k) for k in MLX_LM_READS} == {k: theirs.get(k) for k in MLX_LM_READS}
    assert ours["rope_theta"] == legacy["rope_theta"]


def test_translation_is_idempotent_and_shared_fields_are_a_subset():
    for model_type, legacy in LEGACY:
        config = {"model_type": model_type, **SIZES, **legacy}
        once = translated_config(config)
        assert translated_config(once) == once
        shared = for_shared_folder(config)
        assert set(shared) >= set(config)


def test_other_architectures_pass_through_and_unmappable_leaves_shared_folders_alone():
    assert mlx_lm_fields({"model_type": "gpt2"}).overrides == {}
    odd = {"model_type": "llama", "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}
    with pytest.raises(UnmappableRope):
        mlx_lm_fields(odd)
    assert for_shared_folder(odd) == odd
