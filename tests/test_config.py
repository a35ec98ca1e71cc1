"""Recipe config: precedence, coercion, unknown keys with suggestions, validation."""

import pytest

from mlxft.config import Config, build_config, list_recipes, parse_set
from mlxft.errors import ConfigError


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults():
    cfg = build_config()
    assert isinstance(cfg, Config)
    assert cfg.lora.rank == 8 and cfg.train.mask_prompt is True and cfg.backend == "auto"


def test_precedence_defaults_recipe_set_flags(tmp_path):
    recipe = write(tmp_path, "train:\n  steps: 10\n  batch_size: 2\nlora:\n  rank: 4\n  alpha: 8\n")
    cfg = build_config(recipe)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.lora.rank) == (10, 2, 4)
    cfg = build_config(recipe, ["train.steps=20", "lora.rank=16"])
    assert (cfg.train.steps, cfg.lora.rank, cfg.lora.alpha) == (20, 16, 8.0)
    cfg = build_config(recipe, ["train.steps=20"], {"train": {"steps": 30}, "model": "x/y"})
    assert cfg.train.steps == 30 and cfg.model == "x/y"
    # A flag left unset (None) does not override the recipe.
    cfg = build_config(recipe, [], {"train": {"steps": None}})
    assert cfg.train.steps == 10


def test_set_parses_types():
    nested = parse_set(["train.learning_rate=1e-4", "train.mask_prompt=false", "lora.targets=q_proj,v_proj"])
    cfg = build_config(None, ["train.learning_rate=1e-4", "train.mask_prompt=false", "lora.targets=q_proj,v_proj",
                              "lora.layers=null"])
    assert nested["train"]["mask_prompt"] is False
    assert cfg.train.learning_rate == 1e-4 and cfg.train.mask_prompt is False
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.layers is None


def test_unknown_key_suggests_closest(tmp_path):
    recipe = write(tmp_path, "train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'.*train.learning_rate"):
        build_config(recipe)
    with pytest.raises(ConfigError, match=r"--set: unknown key 'lora.rnk'.*lora.rank"):
        build_config(None, ["lora.rnk=4"])
    with pytest.raises(ConfigError, match="unknown key 'modle'.*'model'"):
        build_config(write(tmp_path, "modle: x\n", "m.yaml"))


@pytest.mark.parametrize("text,key", [
    ("train:\n  batch_size: two\n", "train.batch_size"),
    ("train:\n  steps: -3\n", "train.steps"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout"),
    ("lora:\n  type: qlora\n", "lora.type"),
    ("train:\n  mask_prompt: maybe\n", "train.mask_prompt"),
    ("backend: tpu\n", "backend"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(write(tmp_path, text))


def test_invalid_yaml_names_file_and_line(tmp_path):
    recipe = write(tmp_path, "train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: invalid YAML"):
        build_config(recipe)


def test_unknown_recipe_name():
    with pytest.raises(ConfigError, match="unknown recipe 'quickstrat'.*quickstart"):
        build_config("quickstrat")


def test_every_shipped_recipe_validates_and_has_a_command_header():
    names = list_recipes()
    assert "quickstart" in names
    from mlxft.config import recipe_path

    for name in names:
        cfg = build_config(name)
        text = recipe_path(name).read_text()
        assert f"mlxft train {name}" in text, f"{name}: header must show the command that runs it"
        if cfg.data.train:
            from pathlib import Path

            assert Path(cfg.data.train).is_file(), f"{name}: data.train {cfg.data.train} missing"
