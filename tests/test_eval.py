"""`mlxft eval`: figures equal a hand computation on a tiny model; a run shows base and tuned
side by side with the difference; bad data fails on one line naming the file and line."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from tests.helpers.data import write_jsonl

CHATS = [
    [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue, mostly."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "An apple."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "A pear."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}],
]


def train_tiny(model_dir, out, data, valid, *sets):
    from mlxft.config import build_config
    from mlxft.pipeline import train_run

    cfg = build_config(None, ["train.dtype=float32", *sets],
                       {"model": str(model_dir), "backend": "torch", "data": {"train": str(data), "valid": str(valid)}})
    return train_run(cfg, out)


def hand_figures(model_dir, path, fmt="chat"):
    """Loss / ppl / accuracy straight from transformers logits, one unpadded sample at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlxft.data import tokenize_record

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, n, correct = 0.0, 0, 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        sample = tokenize_record(tok, record, fmt, mask_prompt=True)
        picked = tok.decode([t for t, m in zip(sample.ids, sample.targets) if m])
        if fmt == "chat":  # the training masking: exactly the assistant turns and their end-of-turn token
            messages = record["messages"]
            assert picked == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        else:  # text: every token, and the EOS the model must learn to emit
            assert picked.endswith(record["text"] + tok.eos_token)
        ids = torch.tensor([sample.ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        for t in range(1, len(sample.ids)):
            if sample.targets[t]:
                nll -= float(logp[t - 1, sample.ids[t]])
                correct += int(int(logp[t - 1].argmax()) == sample.ids[t])
                n += 1
    return {"loss": nll / n, "ppl": math.exp(nll / n), "accuracy": correct / n, "tokens": n}


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory, default_model_dir):
    """A tiny model with an untied head, so its top-1 predictions vary (some are right)."""
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("eval") / "tiny", default_model_dir, seed=3,
                           tie_word_embeddings=False)


# Tolerances on losses. A tiny random model's loss is about ln(49152) = 10.8 nats per token. In
# float32, the log-sum-exp over V = 49152 logits carries a relative rounding of about
# sqrt(V) * 2**-24 = 1.3e-5 in its sum, which the log turns into 1.3e-5 nats; logits computed in
# differently shaped batches (padding, packing) differ by float32 rounding of similar relative
# size (~1e-6 of 10.8). So two evaluations of the same loss agree to ~1e-6 relative: rel=1e-5 is
# the bound where the same library computes both, rel=1e-4 where one side merges the adapter
# into the weights (one more rounding per weight) or is another framework (MLX). Perplexity
# exp(loss) turns the loss's absolute error (1e-5 * 10.8 = 1.1e-4 at rel=1e-5) into the same
# relative error, hence rel=1e-4 there. A target token masked wrongly or a sample dropped moves
# the mean by a whole token's loss over the token count, far beyond these bounds.


def test_eval_equals_hand_computation(varied_model, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    res = CliRunner().invoke(cli, ["eval", str(varied_model), "--data", str(data), "--json", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    want = hand_figures(varied_model, data)
    assert got["samples"] == 3 and got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-4)
    assert got["accuracy"] == pytest.approx(want["accuracy"])
    text = CliRunner().invoke(cli, ["eval", str(varied_model), "--data", str(data)])
    assert text.exit_code == 0 and "perplexity" in text.stdout and f"{want['loss']:.4f}" in text.stdout


def test_eval_run_base_vs_tuned(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in CHATS] * 4)
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"messages": m} for m in CHATS])
    run = tmp_path / "run"
    train_tiny(tiny_model_dir, run, train, valid, "train.steps=8", "train.learning_rate=1e-2",
               "retention.enabled=false", "train.eval_every=4")
    res = CliRunner().invoke(cli, ["eval", str(run), "--json"])  # default data: the run's validation file
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["data"] == str(valid) and got["adapter"].endswith("adapter-best")
    base = hand_figures(tiny_model_dir, valid)
    assert got["base"]["loss"] == pytest.approx(base["loss"], rel=1e-5)
    assert got["tuned"]["loss"] < got["base"]["loss"] - 0.1  # trained on the same conversations
    for key in ("loss", "ppl", "accuracy"):
        assert got["delta"][key] == pytest.approx(got["tuned"][key] - got["base"][key])
    # the tuned figure is the best adapter's: its validation loss as the trainer recorded it
    from mlxft.runs import Run

    best = min(r["loss"] for r in Run(run).metrics() if r.get("type") == "valid")
    assert got["tuned"]["loss"] == pytest.approx(best, rel=1e-4)
    table = CliRunner().invoke(cli, ["eval", str(run), "--data", str(valid)])
    assert table.exit_code == 0
    assert "base" in table.stdout and "tuned" in table.stdout and "change" in table.stdout


def test_eval_text_format_equals_hand_computation(varied_model, tmp_path):
    """Text records: every token scored, BOS/EOS as in training; padding in a batch changes nothing."""
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "The cat sat on the mat, and then it slept."},
                                                 {"text": "a b c d e f g"}, {"text": "Hello!"}])
    res = CliRunner().invoke(cli, ["eval", str(varied_model), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    want = hand_figures(varied_model, data, fmt="text")
    assert got["format"] == "text" and got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["accuracy"] == pytest.approx(want["accuracy"])


def test_eval_bad_data_is_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    res = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--data", str(bad)])
    assert res.exit_code == 1
    assert f"{bad}:1" in res.output and "assistant" in res.output
    none = CliRunner().invoke(cli, ["eval", str(tiny_model_dir)])
    assert none.exit_code == 1 and "--data" in none.output


@pytest.mark.mlx
def test_eval_mlx_backend_equals_hand_computation(varied_model, tmp_path):
    pytest.importorskip("mlx_lm")
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    res = CliRunner().invoke(cli, ["eval", str(varied_model), "--data", str(data), "--json", "--backend", "mlx"])
    assert res.exit_code == 0, res.output
    got, want = json.loads(res.stdout), hand_figures(varied_model, data)
    assert got["backend"] == "mlx" and got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert got["accuracy"] == pytest.approx(want["accuracy"])


def test_eval_run_scores_its_held_out_split(tiny_model_dir, tmp_path):
    """A run without a validation file held out a seeded share of its training file: `eval RUN`
    with no --data scores exactly that share (the trainer's own validation figure on it)."""
    chats = [[{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
             for i in range(12)]
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in chats])
    from mlxft.config import build_config
    from mlxft.data import load_dataset, split_dataset
    from mlxft.pipeline import train_run

    run = tmp_path / "run"
    cfg = build_config(None, ["train.dtype=float32", "data.valid_split=0.25", "seed=5", "train.steps=6",
                              "train.learning_rate=1e-2", "retention.enabled=false", "train.eval_every=3"],
                       {"model": str(tiny_model_dir), "backend": "torch", "data": {"train": str(train)}})
    train_run(cfg, run)
    res = CliRunner().invoke(cli, ["eval", str(run), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["data"] == f"{train} (held out)" and got["samples"] == 3
    from mlxft.runs import Run

    best = min(r["loss"] for r in Run(run).metrics() if r.get("type") == "valid")
    assert got["tuned"]["loss"] == pytest.approx(best, rel=1e-4)
    # the base figure is the hand computation on those same three conversations
    from transformers import AutoTokenizer

    full = load_dataset(train, AutoTokenizer.from_pretrained(str(tiny_model_dir)), max_seq_len=cfg.train.max_seq_len)
    _, held = split_dataset(full, 0.25, 5)
    lines = {int(s.source.rsplit(":", 1)[1]) for s in held.samples}
    held_file = write_jsonl(tmp_path / "held.jsonl", [{"messages": chats[n - 1]} for n in sorted(lines)])
    assert got["base"]["loss"] == pytest.approx(hand_figures(tiny_model_dir, held_file)["loss"], rel=1e-5)
    longer = CliRunner().invoke(cli, ["eval", str(run), "--json", "--max-seq-len", "2048"])
    assert longer.exit_code == 0, longer.output
    assert json.loads(longer.stdout)["base"]["loss"] == pytest.approx(got["base"]["loss"], rel=1e-6)
