"""NEFTune (train.neftune_alpha): uniform noise of half-width alpha / sqrt(L * d) on the input
embeddings in training mode only, on both backends; evaluation sees none."""

from __future__ import annotations

import math

import pytest

from mlxft.data import collate
from tests.helpers.mlx import config, load_torch, samples

ALPHA = 5.0


def _noise(backend, ids):
    """What the hook added to the embeddings of `ids` (one row), in the model's current mode."""
    import torch

    emb = backend._causal_lm().get_input_embeddings()
    x = torch.tensor([ids])
    with torch.no_grad():
        hooked = emb(x)
        plain = torch.nn.functional.embedding(x, emb.weight)
    return (hooked - plain).float()


def test_noise_in_training_mode_only_scaled_as_in_the_paper(tiny_model_dir):
    backend = load_torch(config(neftune_alpha=ALPHA), tiny_model_dir, train=True)
    ids = samples()[1].ids
    dim = backend._causal_lm().config.hidden_size
    bound = ALPHA / math.sqrt(len(ids) * dim)
    noise = _noise(backend, ids)
    n = noise.numel()
    assert noise.abs().max() <= bound * (1 + 1e-6)  # never beyond alpha / sqrt(L d)
    # Uniform on [-b, b]: P(every one of n draws within 0.9 b) = 0.9^n, about 1e-59 for n = 1280.
    assert noise.abs().max() > 0.9 * bound
    # E[x^2] = b^2 / 3; the mean of n draws of x^2 / b^2 has standard deviation sqrt(4 / (45 n)),
    # 0.0083 for n = 1280, so 0.05 is six of them: a wrong scale (sqrt(d) alone, or L * d without
    # the root) is off by far more.
    assert abs(float((noise ** 2).mean()) / bound ** 2 - 1 / 3) < 0.05, n
    backend.model.eval()
    assert float(_noise(backend, ids).abs().max()) == 0.0  # eval mode: the embeddings as they are


def test_off_at_eval_on_in_the_training_step(tiny_model_dir):
    """Validation losses equal those of a run without NEFTune; the training step's loss differs
    (the noise reaches the forward pass it differentiates)."""
    plain = load_torch(config(learning_rate=1e-2), tiny_model_dir, train=True)
    noisy = load_torch(config(learning_rate=1e-2, neftune_alpha=200.0), tiny_model_dir, train=True)
    noisy.model.load_state_dict(plain.model.state_dict())  # the same fresh adapter in both
    batch = collate(samples(), plain.tokenizer.pad_token_id)
    assert noisy.eval_batch(batch).loss_sum == plain.eval_batch(batch).loss_sum
    assert noisy.model.training  # eval_batch put the model back in training mode
    # One step on the same adapter: alpha 200 moves each embedding entry by up to
    # 200 / sqrt(20 * 64) = 5.6, far beyond the tiny model's embedding scale, so the loss moves.
    assert abs(noisy.train_step([batch], 0.0).loss - plain.train_step([batch], 0.0).loss) > 1e-3


def test_mlx_noise_in_training_mode_only_scaled_as_in_the_paper(tiny_model_dir):
    """The MLX backend draws the same noise (MLX's RNG, not torch's): the same bound and spread
    checks as above, nothing in eval mode, and the compiled training step sees it."""
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    import numpy as np

    from tests.helpers.mlx import load_mlx

    backend = load_mlx(config(neftune_alpha=ALPHA), tiny_model_dir, train=True)
    emb = backend.model.model.embed_tokens
    ids = samples()[1].ids
    x = mx.array([ids])
    bound = ALPHA / math.sqrt(len(ids) * backend.config["hidden_size"])
    noise = np.array(emb(x) - emb.weight[x])
    assert np.abs(noise).max() <= bound * (1 + 1e-6) and np.abs(noise).max() > 0.9 * bound
    assert abs(float((noise ** 2).mean()) / bound ** 2 - 1 / 3) < 0.05  # as in the torch test
    backend.model.eval()
    assert float(np.abs(np.array(emb(x) - emb.weight[x])).max()) == 0.0
    backend.model.train()
    plain = load_mlx(config(), tiny_model_dir, train=True)
    plain.model.update(backend.model.trainable_parameters())  # the same fresh adapter
    batch = collate(samples(), plain.tokenizer.pad_token_id)
    # the same float32 computation in both; 1e-6 allows another fusion order between the two compiled graphs
    assert backend.eval_batch(batch).loss_sum == pytest.approx(plain.eval_batch(batch).loss_sum, rel=1e-6)
    # alpha 200, as in the torch test: the step's loss moves
    noisy = load_mlx(config(neftune_alpha=200.0), tiny_model_dir, train=True)
    noisy.model.update(plain.model.trainable_parameters())
    assert abs(noisy.train_step([batch], 0.0).loss - plain.train_step([batch], 0.0).loss) > 1e-3


def test_negative_alpha_is_refused():
    from mlxft.config import build_config
    from mlxft.errors import ConfigError

    with pytest.raises(ConfigError, match="train.neftune_alpha"):
        build_config(None, ["train.neftune_alpha=-1"])
