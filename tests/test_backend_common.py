"""The framework-neutral helpers both backends share (mlxft/backends/common.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mlxft.backends.common import adapted_layer_count, eval_mode, resolve_lora_targets, split_like
from mlxft.templates import eos_ids
from mlxft.errors import ModelError


def test_lora_targets_keep_present_names_in_order():
    available = {"q_proj", "v_proj", "embed_tokens"}
    assert resolve_lora_targets(["v_proj", "nope", "q_proj"], available, {"q_proj", "v_proj"}) == ["v_proj", "q_proj"]
    assert resolve_lora_targets(["all-linear"], available, set()) is None


def test_lora_targets_none_present_names_the_linear_layers():
    with pytest.raises(ModelError) as err:
        resolve_lora_targets(["wq"], {"q_proj"}, {"v_proj", "q_proj"})
    assert "none of ['wq']" in str(err.value)
    assert "q_proj, v_proj" in str(err.value)


def test_adapted_layer_count():
    assert adapted_layer_count(None, 12) == 12
    assert adapted_layer_count(4, 12) == 4
    assert adapted_layer_count(40, 12) == 12


def test_eos_ids_from_ints_lists_and_none():
    assert eos_ids(2, [2, 7, "x"], None, (9,)) == {2, 7, 9}
    assert eos_ids(None) == set()


class _Model:
    def __init__(self, training):
        self.training = training

    def eval(self):
        self.training = False

    def train(self):
        self.training = True


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_even_on_error(training):
    model = _Model(training)
    with pytest.raises(RuntimeError), eval_mode(model):
        assert model.training is False
        raise RuntimeError
    assert model.training is training


def test_split_like_inverts_concatenation():
    likes = [np.zeros((2, 3)), np.zeros(4), np.zeros((1, 1, 2))]
    flat = np.arange(12.0)
    parts = split_like(flat, likes)
    assert [p.shape for p in parts] == [(2, 3), (4,), (1, 1, 2)]
    assert np.array_equal(np.concatenate([p.reshape(-1) for p in parts]), flat)
