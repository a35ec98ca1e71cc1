"""16-bit weights for generation on PyTorch (mlxft.decode.weights): only the Linear weights change
dtype (the embedding, a tied output layer's input side and the activations stay float32), the
logits stay within 16-bit rounding of the float32 model's, measuring the dtypes leaves the float32
model and the RNG exactly as they were, `auto` decides from the measured figures by its rule and
measures once per model shape (until `doctor --bench` drops the figure), and `generate --dtype`
says what it runs on."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tests.tiny import make_tiny_model

torch = pytest.importorskip("torch")

IDS = [1, 17, 230, 42, 9, 311, 5, 77]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_dir):
    return make_tiny_model(tmp_path_factory.mktemp("weights") / "tiny", default_model_dir, initializer_range=0.3)


def _load(model_dir, weights):
    from mlxft.inference import load_backend

    return load_backend(model_dir, None, "torch", weights=weights)


def test_only_linear_weights_change_and_logits_stay_within_rounding(model_dir):
    want = _load(model_dir, "float32").logits(IDS)
    errors = {}
    for dtype, bits in (("bfloat16", 8), ("float16", 11)):
        be = _load(model_dir, dtype)
        assert (be.weights_dtype, be.weights_reason) == (dtype, "asked for")
        lm = be._causal_lm()
        linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.weight.dtype == getattr(torch, dtype) for m in linears)
        embed = lm.get_input_embeddings().weight
        assert embed.dtype == torch.float32
        assert lm.get_output_embeddings().weight.data_ptr() != embed.data_ptr()  # the tie is a copy now
        got = be.logits(IDS)
        assert got.dtype == want.dtype == "float32"
        # Each weight and each projection's input are rounded to `bits` significant bits: a
        # relative error of 2**-bits per product, summed over the two layers' seven projections
        # and the head (measured on this model: 12 units for bf16, 6 for f16).
        errors[dtype] = float(abs(got - want).max() / abs(want).max())
        assert 0 < errors[dtype] <= 64 * 2.0 ** -bits, (dtype, errors[dtype] / 2.0 ** -bits)
    assert errors["float16"] < errors["bfloat16"] / 2  # three more significant bits show


def test_measuring_leaves_the_float32_model_as_it_was(model_dir):
    from mlxft.decode.weights import PROBE_ROWS, measure_weight_dtypes

    be = _load(model_dir, "float32")
    lm = be._causal_lm()
    before = be.logits(IDS)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    rng = torch.get_rng_state().clone()
    seconds = measure_weight_dtypes(be.model)
    # greedy probes draw nothing: a first load (which measures) samples as later ones do
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(seconds) == {"float32", "float16"}
    assert all(len(v) == len(PROBE_ROWS) and min(v) > 0 for v in seconds.values())
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
               for m in lm.modules() if isinstance(m, torch.nn.Linear))
    assert (lm.get_output_embeddings().weight is lm.get_input_embeddings().weight) == tied
    assert (be.logits(IDS) == before).all()


def test_auto_rule():
    from mlxft.decode.weights import choose_weight_dtype

    f32 = [0.050, 0.140]
    # float16 no slower at either row count and clearly faster at one: chosen
    assert choose_weight_dtype({"float32": f32, "bfloat16": [0.045, 0.080], "float16": [0.030, 0.130]})[0] == "float16"
    # faster for one stream but slower for a batch (float16 on an AMD EPYC Zen 5): not chosen,
    # since one dtype serves every batch size
    dtype, why = choose_weight_dtype({"float32": f32, "bfloat16": [0.060, 0.090], "float16": [0.030, 0.160]})
    assert dtype == "float32" and "float16 1.67x/0.88x" in why and "bfloat16 0.83x/1.56x" in why
    # no slower, but not clearly faster anywhere
    assert choose_weight_dtype({"float32": f32, "bfloat16": [0.049, 0.130], "float16": [0.048, 0.139]})[0] == "float32"
    # bfloat16 is never auto's choice, however fast (it changes greedy answers: docs/serve.md)
    assert choose_weight_dtype({"float32": f32, "bfloat16": [0.010, 0.010], "float16": [0.060, 0.200]})[0] == "float32"
    assert choose_weight_dtype({"float32": f32, "bfloat16": [0.010, 0.010]})[0] == "float32"


def test_auto_measures_once_per_model_shape(model_dir, monkeypatch, tmp_path):
    from mlxft.decode import weights

    monkeypatch.setenv("MLXFT_HOME", str(tmp_path / "fresh-home"))  # nothing measured yet
    calls = []
    real = weights.measure_weight_dtypes

    def counted(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(weights, "measure_weight_dtypes", counted)
    first = _load(model_dir, "auto")
    second = _load(model_dir, "auto")
    assert len(calls) == 1
    assert first.weights_dtype == second.weights_dtype in ("float32", "float16")
    assert first.weights_reason == second.weights_reason and first.weights_reason.startswith("auto: ")
    from mlxft import devicebench

    devicebench.matmul_gflops(8, 8, 8)  # what doctor --bench runs: a different shape, cache kept
    _load(model_dir, "auto")
    assert len(calls) == 1
    devicebench.matmul_gflops()  # doctor --bench: the decode figures are measured again
    _load(model_dir, "auto")
    assert len(calls) == 2


def test_generate_says_which_weights_it_runs_on(model_dir):
    from mlxft.cli import cli

    result = CliRunner().invoke(cli, ["generate", str(model_dir), "-p", "Hello", "-n", "4", "--raw",
                                      "--backend", "torch", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "generating with bfloat16 weights (asked for)" in result.output
    bad = CliRunner().invoke(cli, ["generate", str(model_dir), "-p", "Hello", "--dtype", "int4"])
    assert bad.exit_code == 2 and "--dtype" in bad.output
