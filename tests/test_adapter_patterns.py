"""PEFT's rank_pattern / alpha_pattern mean the same to every mlxft reader of an adapter (fuse,
the mlx-lm layout, the MLX backend) as to PEFT itself: PEFT builds the model, and the rank and
scale PEFT gave each module are what mlxft reads back from the saved folder."""

from __future__ import annotations

import pytest

from mlxft.adapters import module_scale, pattern_key

# Regular-expression keys, and keys whose order decides (PEFT takes the first that matches, in
# the order of the saved config, whose keys PEFT sorts):
#  - "layers.1.self_attn.q_proj" sorts before "q_proj", so layer 1's q_proj gets 4 and layer 0's
#    32 (a last-match reading would give both 32);
#  - "self_attn.(k|v)_proj" is a regular expression (an exact-or-suffix reading matches nothing);
#  - "layers.0.mlp.down_proj" matches one module by suffix; "^model.layers.1.self_attn.o_proj"
#    is anchored but still matched by PEFT's `(.*\.)?(key)$` on the whole path.
RANK_PATTERN = {"layers.0.mlp.down_proj": 2, r"self_attn\.(k|v)_proj": 6}
ALPHA_PATTERN = {"q_proj": 32, "layers.1.self_attn.q_proj": 4, r"self_attn\.(k|v)_proj": 3,
                 "model.layers.1.self_attn.o_proj": 40}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def test_pattern_key_matches_peft():
    from peft.utils.other import get_pattern_key

    modules = [f"model.layers.{i}.{part}" for i in range(2)
               for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.down_proj", "mlp.up_proj")]
    for pattern in (RANK_PATTERN, ALPHA_PATTERN, {"proj": 1}, {"layers.[01].mlp": 2, "down_proj": 3}):
        for module in modules:
            theirs = get_pattern_key(pattern.keys(), module)
            assert pattern_key(pattern.keys(), module) == (theirs if theirs in pattern else None), (pattern, module)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, default_model_dir):
    """A PEFT LoRA on a tiny llama with rank and alpha patterns, saved, and the (r, scaling) per
    module that PEFT gives it when it loads the saved folder. (PEFT writes adapter_config.json with
    sorted keys, so the order that decides between overlapping keys is the file's, not the order
    they were given in; the loaded model is the reference a user's adapter has.)"""
    pytest.importorskip("peft")
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_tiny_model

    work = tmp_path_factory.mktemp("patterns")
    base = make_tiny_model(work / "tiny-llama", default_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern=RANK_PATTERN,
                        alpha_pattern=ALPHA_PATTERN, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                   config).save_pretrained(str(work / "adapter"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                       str(work / "adapter"))
    want = {name: (module.r["default"], module.scaling["default"])
            for name, module in loaded.base_model.model.named_modules() if isinstance(module, LoraLayer)}
    return base, work / "adapter", want


def test_every_reader_gives_peft_rank_and_scale(peft_adapter):
    from mlxft.adapters import linear_factors, read_adapter_config
    from mlxft.adapters import Adapter

    base, folder, want = peft_adapter
    assert len(want) == 2 * len(TARGETS)
    # the patterns do reach modules, with values that differ from the defaults (r 4, scale 2)
    assert {r for r, _ in want.values()} == {2, 4, 6} and len({s for _, s in want.values()}) >= 4

    fused = Adapter(folder)
    assert set(fused.modules) == set(want)
    config, groups = linear_factors(folder)
    config_only = read_adapter_config(folder)
    for module, (r, scale) in want.items():
        # rank: the saved factors; scale: alpha / r exactly as PEFT computed it (same float ops)
        assert fused.rank(module) == r and groups[module]["A"].shape[0] == r
        assert fused.scale(module) == scale
        assert groups[module]["scale"] == scale
        assert module_scale(config_only, module) == scale  # from the config alone (rank_pattern)


def test_mlx_backend_and_mlx_lm_layout_use_peft_scale(peft_adapter, tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm import load as mlx_load
    from mlx_lm.tuner.lora import LoRALinear

    from mlxft.backends.mlx_adapters import apply_peft
    from mlxft.mlx_lm_layout import write_mlx_lm_adapter

    base, folder, want = peft_adapter
    model, _ = mlx_load(str(base))
    apply_peft(model, folder)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert set(layers) == set(want)
    for module, (r, scale) in want.items():
        # mlx-lm keeps the scale as a Python float or a float32 scalar: equal to PEFT's
        # float64 alpha / r within float32 rounding (half an ulp, 2^-24 relative)
        assert layers[module].lora_a.shape[1] == r
        assert float(layers[module].scale) == pytest.approx(scale, rel=2 ** -23)
    info = write_mlx_lm_adapter(folder, tmp_path / "mlx-lm", base)
    assert info["layers_adapted"] == len(want)
