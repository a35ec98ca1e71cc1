"""Replay as distillation (`data.replay_distill`, mlxft/replay_distill.py): the soft-target loss
of the fused head against float64 and the plain head, a one-hot soft target giving exactly the
hard loss, MLX against PyTorch on the same soft batch, the base model's top-K read off the fresh
adapter, and a run that saves them and resumes on the same ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxft.data import Sample, collate, pack
from mlxft.replay_distill import renormalised, teacher_targets

torch = pytest.importorskip("torch")


def _case(seed=0, T=37, V=1000, d=24, k=5):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=gen).double()
    w = (torch.randn(V, d, generator=gen) * 0.5).float().double()
    y = torch.randint(0, V, (T, k), generator=gen)
    p = torch.rand(T, k, generator=gen, dtype=torch.float64)
    p = (p / p.sum(1, keepdim=True)).float()
    return h, w, y, p


def top_k_rows(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the k most likely tokens of each row under the full softmax, and their
    probabilities renormalised over those k."""
    full = np.exp(logits - logits.max(1, keepdims=True))
    full /= full.sum(1, keepdims=True)
    ids = np.argsort(-full, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(full, ids, axis=1)
    return ids, top / top.sum(1, keepdims=True)


def test_renormalised_top_k_logits_are_the_renormalised_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    ids, want = top_k_rows(logits, 4)
    p = renormalised(np.take_along_axis(logits, ids, axis=1))
    assert np.allclose(p, want, rtol=1e-6) and np.allclose(p.sum(1), 1.0, atol=1e-6)


def test_soft_fused_logp_equals_float64_and_one_hot_equals_the_hard_loss():
    from mlxft.backends.torch_loss import fused_linear_logp

    h64, w64, y, p = _case()
    h = h64.float().requires_grad_()
    logp = fused_linear_logp(h, w64.float(), y, 8, p)
    incoming = torch.linspace(-1, 1, len(y))
    (logp * incoming).sum().backward()

    hr = h64.clone().requires_grad_()
    ref = (torch.log_softmax(hr @ w64.T, dim=1).gather(1, y) * p.double()).sum(1)
    (ref * incoming.double()).sum().backward()
    assert torch.allclose(logp.double(), ref, rtol=0, atol=2e-5)  # |logp| ~ 7-20: a few f32 ulps
    err = float((h.grad.double() - hr.grad).norm() / hr.grad.norm())
    assert err < 1e-5
    # a gradient that left out the softmax's share (mass) of any position would be far off
    assert float(hr.grad.norm()) > 0.1

    # one-hot soft targets are the hard loss, to the bit
    hard_y = y[:, 0]
    one_hot = torch.zeros_like(p)
    one_hot[:, 0] = 1
    a = h64.float().requires_grad_()
    b = h64.float().requires_grad_()
    soft = fused_linear_logp(a, w64.float(), y, 8, one_hot)
    hard = fused_linear_logp(b, w64.float(), hard_y, 8)
    (soft * incoming).sum().backward()
    (hard * incoming).sum().backward()
    assert torch.equal(soft, hard) and torch.equal(a.grad, b.grad)


def _soft_sample(sample: Sample, vocab: int, k: int, seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    n = len(sample.ids)
    ids = rng.integers(0, vocab, size=(n, k))
    p = rng.random((n, k)).astype(np.float32)
    p /= p.sum(1, keepdims=True)
    return Sample(list(sample.ids), list(sample.targets), "replay:x", (ids, p))


def test_collate_and_pack_carry_soft_targets_and_plain_rows_stay_one_hot():
    plain = Sample([5, 6, 7, 8], [False, False, True, True])
    soft = _soft_sample(Sample([9, 10, 11], [False, True, True]), 100, 3, 0)
    assert collate([plain], 0).soft_ids is None  # no soft member: the hard path
    for batch in (collate([plain, soft], 0), pack([plain, soft], 0, 16)):
        assert batch.soft_ids.shape == batch.input_ids.shape + (3,)
        where = np.nonzero(batch.loss_mask)
        row_ids, row_p = batch.soft_ids[where], batch.soft_p[where]
        assert np.allclose(row_p.sum(1), 1.0)
        plain_rows = row_p[:, 0] == 1.0
        assert np.array_equal(row_ids[plain_rows, 0], batch.input_ids[where][plain_rows])
        got = sorted(map(tuple, row_ids[~plain_rows]))
        assert got == sorted(map(tuple, soft.soft[0][1:]))


@pytest.fixture(scope="module")
def tiny_fast_dir(tmp_path_factory, default_model_dir):
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", default_model_dir, initializer_range=0.2)


def test_soft_step_fused_equals_the_plain_head(tiny_fast_dir, tmp_path):
    from tests.helpers.data import ROWS, write_jsonl
    from tests.test_torch_fast import RTOL, _plain_loss_sum, assert_close, backend_for

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    b = backend_for(tiny_fast_dir, data)
    from mlxft.data import load_dataset

    ds = load_dataset(data, b.tokenizer, 128)
    vocab = b.model.get_input_embeddings().weight.shape[0]
    batch = collate([ds.samples[0], _soft_sample(ds.samples[1], vocab, 4, 1), ds.samples[2]],
                    b.tokenizer.pad_token_id)

    def run(plain: bool):
        from mlxft.backends import torch_backend

        real = torch_backend.fusable_head
        if plain:
            torch_backend.fusable_head = lambda head, cap: False
        try:
            b.optimizer.zero_grad(set_to_none=True)
            with b._compute():
                hidden, labels = b._hidden(batch)
                loss = b._loss_sum(hidden, labels, need_grad=True, soft=b._soft_targets(batch)) / batch.n_targets
                loss.backward()
        finally:
            torch_backend.fusable_head = real
        return float(loss.detach()), torch.cat([q.grad.flatten() for q in b._trainable()])

    fused, plain = run(False), run(True)
    assert_close(fused, plain)
    # and the soft targets matter: the hard loss of the same batch differs
    b.optimizer.zero_grad(set_to_none=True)
    with b._compute():
        hidden, labels = b._hidden(batch)
        hard = float(_plain_loss_sum(b, hidden, labels).detach()) / batch.n_targets
    assert abs(hard - fused[0]) > 10 * RTOL * hard  # well beyond the fused-vs-plain tolerance


@pytest.mark.mlx
def test_mlx_soft_loss_equals_torch(tiny_model_dir):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from tests.helpers.mlx import config, load_mlx, load_torch, samples

    cfg = config("lora")
    s = samples()
    s[1] = _soft_sample(s[1], 64, 4, 2)
    batch = collate(s, 2)
    losses = {}
    for name, make in (("mlx", load_mlx), ("torch", load_torch)):
        be = make(cfg, tiny_model_dir)
        losses[name] = be.train_step([batch], 1e-3).loss
        losses[name + "-hard"] = make(cfg, tiny_model_dir).train_step([collate(samples(), 2)], 1e-3).loss
    assert abs(losses["mlx"] - losses["torch"]) < 1e-3  # the bound of the SFT parity test
    assert abs(losses["mlx"] - losses["mlx-hard"]) > 1e-2


@pytest.mark.mlx
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_mlx_chunked_loss_trains_and_equals_one_chunk(tiny_model_dir, monkeypatch, soft):
    """More targets than one LM-head chunk (mx.checkpoint per chunk) train, to the same loss and
    gradient as a single chunk: the labels are indices and must not be differentiated."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlxft.backends import mlx_backend
    from tests.helpers.mlx import config, load_mlx, samples

    cfg = config("lora")
    s = samples()
    if soft:
        s[1] = _soft_sample(s[1], 64, 4, 2)
    batch = collate(s, 2)
    assert batch.n_targets > 8
    whole = load_mlx(cfg, tiny_model_dir).train_step([batch], 1e-3)
    monkeypatch.setattr(mlx_backend, "LOSS_CHUNK", 8)
    chunked = load_mlx(cfg, tiny_model_dir).train_step([batch], 1e-3)
    assert chunked.finite and abs(chunked.loss - whole.loss) < 1e-4
    assert abs(chunked.grad_norm - whole.grad_norm) < 1e-3 * whole.grad_norm


def test_teacher_targets_are_the_fresh_models_top_k(tiny_fast_dir, tmp_path):
    from tests.helpers.data import ROWS, write_jsonl
    from tests.test_torch_fast import backend_for

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    b = backend_for(tiny_fast_dir, data, fresh=True)
    from mlxft.data import load_dataset

    sample = load_dataset(data, b.tokenizer, 128).samples[0]
    ids, p = teacher_targets(b, sample, 6)
    logits = b.logits(sample.ids)
    for i in range(1, len(sample.ids)):
        if sample.targets[i]:
            want_ids, want_p = top_k_rows(logits[i - 1][None], 6)
            assert np.array_equal(ids[i], want_ids[0]) and np.allclose(p[i], want_p[0])
        else:
            assert ids[i, 0] == sample.ids[i] and p[i, 0] == 1.0 and not p[i, 1:].any()


def test_the_batched_teacher_equals_one_sample_at_a_time_and_the_full_logits(tiny_fast_dir, tmp_path):
    """Replay samples of different lengths side by side, the LM head at target positions only
    (the PyTorch override), give each sample the targets it gets alone, and the backend-neutral
    default (each row's full logits) gives the same."""
    from tests.helpers.data import ROWS, write_jsonl
    from tests.test_torch_fast import backend_for

    from mlxft.backends.base import Backend
    from mlxft.data import collate, load_dataset
    from mlxft.replay_distill import teacher_targets_batch

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    b = backend_for(tiny_fast_dir, data, fresh=True)
    samples = load_dataset(data, b.tokenizer, 128).samples[:5]
    assert len({len(s.ids) for s in samples}) > 1  # padding is exercised
    together = teacher_targets_batch(b, samples, 6)
    for s, (ids, p) in zip(samples, together):
        alone_ids, alone_p = teacher_targets(b, s, 6)
        assert np.array_equal(ids, alone_ids) and np.allclose(p, alone_p, atol=1e-5)
    batch = collate(samples, b.tokenizer.pad_token_id)
    fast, default = b.target_top_k(batch, 6), Backend.target_top_k(b, batch, 6)
    assert fast[0].shape == (int(batch.loss_mask[:, 1:].sum()), 6)
    assert np.array_equal(fast[0], default[0]) and np.allclose(fast[1], default[1], atol=1e-4)

def test_a_run_saves_the_teacher_and_resume_trains_on_the_same(tiny_fast_dir, tmp_path):
    from tests.helpers.data import ROWS, write_jsonl

    from mlxft.config import build_config
    from mlxft.pipeline import train_run

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    sets = ["train.batch_size=4", "train.dtype=float32", "train.steps=4", "train.eval_every=2",
            "train.save_every=2", "retention.probes=2", "retention.max_new_tokens=8", "data.replay=0.3",
            "data.replay_distill=4", "train.early_stop_patience=0"]
    cfg = build_config(None, sets, {"model": str(tiny_fast_dir), "data": {"train": str(data)}})
    out = tmp_path / "run"
    train_run(cfg, out)
    z = np.load(out / "replay-teacher.npz")
    replay = [json.loads(line) for line in (out / "replay.jsonl").read_text().splitlines() if line.strip()]
    assert replay and z["p0"].shape[1] == 4
    assert np.allclose(z["p0"].sum(1), 1.0, atol=1e-5)
    before = {k: z[k].copy() for k in z.files}

    from mlxft.replay import replay_samples
    from mlxft.replay_distill import attach_teacher
    from mlxft.runs import Run

    class Unusable:  # resume must read the file, not compute from the (trained) model
        def logits(self, ids):
            raise AssertionError("recomputed on resume")

    from transformers import AutoTokenizer

    from mlxft.training_data import training_sets

    tok = AutoTokenizer.from_pretrained(tiny_fast_dir)
    samples_again = replay_samples(cfg, Run(out), tok, len(training_sets(cfg, tok)[0]))
    attach_teacher(cfg, Run(out), Unusable(), samples_again, resume=True)
    assert all(s.soft is not None for s in samples_again)
    assert np.array_equal(samples_again[0].soft[0], before["ids0"])



def test_a_second_run_on_the_same_base_reads_the_teacher_from_the_cache(tiny_fast_dir, tmp_path, monkeypatch):
    """The soft targets depend on the base model only: a new run on the same base reads them from
    MLXFT_HOME/retention/teacher-*.npz and computes none; another K computes them again."""
    from tests.helpers.data import ROWS, write_jsonl

    import mlxft.replay_distill as rd
    from mlxft.config import build_config
    from mlxft.pipeline import train_run

    monkeypatch.setenv("MLXFT_HOME", str(tmp_path / "home"))
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    sets = ["train.batch_size=4", "train.dtype=float32", "train.steps=2", "train.eval_every=2",
            "retention.probes=2", "retention.max_new_tokens=8", "data.replay=0.3", "data.replay_distill=4",
            "train.early_stop_patience=0"]
    cfg = build_config(None, sets, {"model": str(tiny_fast_dir), "data": {"train": str(data)}})
    train_run(cfg, tmp_path / "first")
    computed = []
    real = rd.teacher_targets_batch
    monkeypatch.setattr(rd, "teacher_targets_batch", lambda *a: computed.append(1) or real(*a))
    train_run(cfg, tmp_path / "second")
    assert computed == []
    first, second = np.load(tmp_path / "first" / rd.TEACHER_FILE), np.load(tmp_path / "second" / rd.TEACHER_FILE)
    assert sorted(first.files) == sorted(second.files)
    assert all(np.array_equal(first[k], second[k]) for k in first.files)
    cfg3 = build_config(None, sets + ["data.replay_distill=3"], {"model": str(tiny_fast_dir), "data": {"train": str(data)}})
    train_run(cfg3, tmp_path / "third")
    assert computed and np.load(tmp_path / "third" / rd.TEACHER_FILE)["p0"].shape[1] == 3


@pytest.mark.parametrize("sets, words", [
    (["data.replay_distill=-1"], "'data.replay_distill' must be an integer from 0 (off) to 256"),
])
def test_bad_replay_distill_is_refused_in_one_line(sets, words):
    from mlxft.config import build_config
    from mlxft.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        build_config(None, sets)
    assert words in str(err.value)
    build_config(None, ["data.replay_distill=16"])  # the benchmark's setting is accepted


def test_replay_defaults_by_method(tmp_path):
    """Supervised runs replay 0.2 as distillation unless told otherwise; preference runs replay
    0.5 of plain NLL unless the recipe, --set or a flag names the key."""
    from mlxft.config import PREFERENCE_REPLAY, build_config

    sft = build_config(None, [])
    assert (sft.data.replay, sft.data.replay_distill) == (0.2, 16)
    dpo = build_config(None, ["train.method=dpo"])
    assert (dpo.data.replay, dpo.data.replay_distill) == (PREFERENCE_REPLAY, 0)
    named = build_config(None, ["train.method=orpo", "data.replay=0.3"])
    assert (named.data.replay, named.data.replay_distill) == (0.3, 0)
    asked = build_config(None, ["train.method=dpo", "data.replay_distill=8"])  # preference runs take it when set
    assert (asked.data.replay, asked.data.replay_distill) == (PREFERENCE_REPLAY, 8)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  method: dpo\ndata:\n  replay: 0\n")
    assert build_config(str(recipe)).data.replay == 0
    plain = build_config(None, ["data.replay_distill=0"])  # sampled tokens, as before distillation
    assert (plain.data.replay, plain.data.replay_distill) == (0.2, 0)


def test_a_run_written_before_distillation_resumes_without_it(tmp_path):
    """RUN/config.yaml from before data.replay_distill existed: that run replayed sampled tokens,
    and reading its config back must not switch distillation on."""
    from mlxft.config import build_config, to_yaml
    from mlxft.runs import Run

    run = tmp_path / "run"
    run.mkdir()
    old = "\n".join(line for line in to_yaml(build_config(None, ["data.replay=0.5"])).splitlines()
                    if "replay_distill" not in line)
    (run / "config.yaml").write_text(old + "\n")
    cfg = Run(run).config()
    assert (cfg.data.replay, cfg.data.replay_distill) == (0.5, 0)
    (run / "config.yaml").write_text(to_yaml(build_config(None, [])))
    assert Run(run).config().data.replay_distill == 16
