"""The batched decoders (mlxft.decode) on a tiny random llama, both backends: rows decoded side by
side with continuous refill give the tokens each gives alone (greedy, and sampled with a seed),
equal to the framework's own one-sequence generation (transformers' generate, mlx-lm's
generate_step); stop ids end a row without the stop token; the prompt cache reuses a prefix and
changes no token; prompts prefilled together from cached prefixes of different lengths give
their own tokens; the PyTorch cache layer grows past its 256-position buffer correctly.

The tiny model is built with a wide weight init (0.3), so its greedy answers differ from prompt
to prompt and from token to token; with the default init it repeats one token, which would make
the comparisons say little. Exactness is argmax identity: padding changes matmul shapes only
(see mlxft/decode/torch_decoder.py), and the top two logits of this model are far apart compared
with float32 rounding."""

from __future__ import annotations

import pytest

from mlxft.decode.base import generate_many
from tests.tiny import make_tiny_model

TEXTS = ["Hello there", "Once upon a time in a land far away", "x",
         "The capital of France is a city with a very long name and", "Once upon a time in a land far away there lived"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared, oversubscribed CPU two
    spinning OpenMP threads made each decode step 10x slower (15 ms against 167 ms, measured)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, default_model_dir):
    return make_tiny_model(tmp_path_factory.mktemp("wide") / "tiny-wide", default_model_dir, initializer_range=0.3)


@pytest.fixture(scope="module", params=["torch", "mlx"])
def backend(request, wide_model_dir):
    if request.param == "mlx":
        pytest.importorskip("mlx_lm")
    from mlxft.inference import load_backend

    return load_backend(wide_model_dir, None, request.param)


def _prompts(backend):
    return [list(backend.tokenizer(t)["input_ids"]) for t in TEXTS]


def _decode(backend, prompts, n, **kw):
    from mlxft.backends.common import eval_mode

    decoder = backend.decoder(prompt_cache_bytes=kw.pop("prompt_cache_bytes", 0))
    with eval_mode(backend.model):
        return generate_many(decoder, prompts, n, **kw), decoder


def test_batched_equals_alone_and_the_framework(backend):
    prompts = _prompts(backend)
    alone = [_decode(backend, [p], 24)[0][0] for p in prompts]
    assert len({tuple(a) for a in alone}) == len(alone) and sum(len(set(a)) > 3 for a in alone) >= 3
    together, _ = _decode(backend, prompts, 24, max_batch=3)  # rows join as others finish
    assert together == alone
    assert [_framework_generate(backend, p, 24) for p in prompts] == alone


def _framework_generate(backend, prompt, n):
    """The framework's own one-sequence greedy generation: transformers' generate, or mlx-lm's
    generate_step (what the MLX backend's generate runs)."""
    if backend.name == "mlx":
        return backend.generate(prompt, n)
    import torch

    stop = backend.stop_ids()
    with torch.inference_mode():
        out = backend.model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                     dtype=torch.long), max_new_tokens=n, do_sample=False,
                                     eos_token_id=sorted(stop), pad_token_id=backend.tokenizer.pad_token_id)
    new = out[0, len(prompt):].tolist()
    return new[:next((i for i, t in enumerate(new) if t in stop), len(new))]


def test_seeded_sampling_does_not_depend_on_batch_mates(backend):
    prompts = _prompts(backend)
    together, _ = _decode(backend, prompts, 16, temperature=1.0, top_p=0.9, seed=5, max_batch=5)
    alone = [_decode(backend, [p], 16, temperature=1.0, top_p=0.9, seed=5 + i)[0][0] for i, p in enumerate(prompts)]
    assert together == alone
    greedy = [_decode(backend, [p], 16)[0][0] for p in prompts]
    assert together != greedy
    other, _ = _decode(backend, prompts, 16, temperature=1.0, top_p=0.9, seed=6, max_batch=5)
    assert other != together


def test_stop_ids_end_a_row(backend):
    prompts = _prompts(backend)
    full = _decode(backend, prompts, 24)[0]
    stop = full[1][6]
    assert stop not in full[1][:6]
    cut, _ = _decode(backend, prompts, 24, stop_ids={stop})
    assert cut[1] == full[1][:6]
    for row, whole in zip(cut, full):
        assert row == whole[:whole.index(stop)] if stop in whole else row == whole


def test_prompt_cache_reuses_prefix_and_changes_nothing(backend):
    prompts = _prompts(backend)
    plain, _ = _decode(backend, prompts, 16)
    cached, decoder = _decode(backend, prompts + prompts[:2], 16, max_batch=2, prompt_cache_bytes=64 << 20)
    assert cached == plain + plain[:2]
    assert decoder.stats["cached_tokens"] > 0


@pytest.mark.parametrize("budget", [2048, 4])
def test_torch_prompts_prefilled_together_from_different_cached_prefixes(wide_model_dir, monkeypatch, budget):
    """Five waiting prompts share one prefill pass (or, under a small token budget, several):
    some start from a cached prefix of another length, one is shorter than the others' new part
    and is left-padded; each gets the tokens it gets alone."""
    from mlxft.backends.common import eval_mode
    from mlxft.decode import torch_decoder
    from mlxft.inference import load_backend

    monkeypatch.setattr(torch_decoder, "PREFILL_TOKENS", budget)
    be = load_backend(wide_model_dir, None, "torch")
    prompts = _prompts(be)
    alone = [_decode(be, [p], 12)[0][0] for p in prompts]
    decoder = be.decoder(prompt_cache_bytes=64 << 20)
    with eval_mode(be.model):
        generate_many(decoder, [prompts[1], prompts[3]], 12)  # the cache holds prompts 1 and 3
        warm = dict(decoder.stats)
        together = generate_many(decoder, prompts, 12, max_batch=5)
    assert together == alone
    assert decoder.stats["cached_tokens"] > warm["cached_tokens"]
    passes = decoder.stats["prefills"] - warm["prefills"]
    assert (passes == 1) if budget == 2048 else (passes > 1)


def test_torch_prefill_hands_the_head_a_contiguous_last_position(wide_model_dir):
    """A prefill of several rows hands the LM head a contiguous [rows, 1, hidden] input: on a
    non-contiguous slice, torch's bf16 linear on CPU copies the head weight once per row (+1.6 GB
    for 32 rows of SmolLM2, measured), and the guard's generation ran at that peak."""
    from mlxft.inference import load_backend

    be = load_backend(wide_model_dir, None, "torch")
    seen = []
    head = be._causal_lm().get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda module, args: seen.append((tuple(args[0].shape),
                                                                             args[0].is_contiguous())))
    try:
        _decode(be, _prompts(be), 3)
    finally:
        hook.remove()
    several_rows = [shape for shape, _ in seen if shape[0] > 1]  # prefills and batched decode steps
    assert several_rows and all(contiguous for _, contiguous in seen)
    assert all(shape[1] == 1 for shape, _ in seen)  # the head still sees the last position only


def test_torch_cache_grows_past_its_buffer(wide_model_dir):
    """270 new tokens cross the 256-position buffer step of GrowingLayer while rows come and go."""
    from mlxft.inference import load_backend

    be = load_backend(wide_model_dir, None, "torch")
    prompts = _prompts(be)[:3]
    alone = [_decode(be, [p], 270)[0][0] for p in prompts]
    assert all(len(a) == 270 for a in alone)
    assert _decode(be, prompts, 270, max_batch=2)[0] == alone


def test_column_major_weights_change_no_value(wide_model_dir):
    """mlxft.decode.layout stores Linear weights transposed: the same values, a loaded inference
    model holds them that way, and greedy generation gives the same tokens."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from mlxft.decode.layout import column_major
    from mlxft.inference import load_backend

    rows, cols = (AutoModelForCausalLM.from_pretrained(wide_model_dir, dtype=torch.float32).eval().requires_grad_(False)
                  for _ in range(2))
    linears = [m for m in cols.modules() if isinstance(m, torch.nn.Linear)]
    assert column_major(cols) == len({id(m.weight) for m in linears}) > 0
    assert all(m.weight.t().is_contiguous() for m in linears) and column_major(cols) == 0
    for a, b in zip(rows.state_dict().values(), cols.state_dict().values()):
        assert torch.equal(a, b)

    # One projection: each output is a K-term float32 dot product, summed in another order.
    # Either order is within gamma_K * sum|x_i w_i| of the exact value (gamma_K = K u / (1 - K u),
    # u = 2^-24, Higham's bound for recursive summation), so the two differ by at most twice that.
    lin_rows = next(m for m in rows.modules() if isinstance(m, torch.nn.Linear))
    k, u = lin_rows.in_features, 2.0 ** -24
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bound = 2 * (k * u / (1 - k * u)) * (x.abs() @ lin_rows.weight.abs().t())
        assert ((linears[0](x) - lin_rows(x)).abs() <= bound).all()
        ids = torch.tensor([[1, 5, 9, 23, 7]])
        greedy = dict(max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(rows.generate(ids, **greedy), cols.generate(ids, **greedy))

    backend = load_backend(wide_model_dir, None, "torch")
    assert all(m.weight.t().is_contiguous() for m in backend.model.modules() if isinstance(m, torch.nn.Linear))
