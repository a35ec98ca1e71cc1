"""Preference tuning end to end on a tiny model (PyTorch backend, f32): TRL's formats and
data.columns read pairs, bad pairs fail in one line naming file and line, DPO and ORPO runs
train and report their figures, the cached reference equals a fresh computation with the
adapter off, a killed DPO run resumes exactly, `mlxft data check` and `mlxft eval` know pairs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from tests.helpers.preference import PAIRS, write_jsonl
from tests.helpers.resume import adapter_tensors, env, train_losses, wait_for_steps

pytest.importorskip("torch")
pytest.importorskip("peft")

def conversational(row):
    return {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def implicit(row):
    c = conversational(row)
    return {"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]}


def test_formats_and_columns_read_the_same_pairs(tiny_model_dir, tmp_path):
    from mlxft.preference.data import load_pairs
    from mlxft.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    rows = PAIRS[:4]
    conv = load_pairs(write_jsonl(tmp_path / "conv.jsonl", [conversational(r) for r in rows]), tok, 256)
    impl = load_pairs(write_jsonl(tmp_path / "impl.jsonl", [implicit(r) for r in rows]), tok, 256)
    assert [p.chosen.ids for p in conv.pairs] == [p.chosen.ids for p in impl.pairs]
    assert [p.rejected.targets for p in conv.pairs] == [p.rejected.targets for p in impl.pairs]

    strings = load_pairs(write_jsonl(tmp_path / "s.jsonl", rows), tok, 256)
    import csv

    with open(tmp_path / "p.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "good", "bad"])
        w.writerows([[r["prompt"], r["chosen"], r["rejected"]] for r in rows])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    from_csv = load_pairs(tmp_path / "p.csv", tok, 256, columns=columns)
    datasets = pytest.importorskip("datasets")
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "p.parquet"))
    from_parquet = load_pairs(tmp_path / "p.parquet", tok, 256, columns=columns)
    datasets.Dataset.from_list(renamed).save_to_disk(str(tmp_path / "saved"))
    from_hf = load_pairs(tmp_path / "saved", tok, 256, columns=columns)
    for other in (from_csv, from_parquet, from_hf):
        assert [(p.chosen.ids, p.rejected.ids) for p in other.pairs] == \
            [(p.chosen.ids, p.rejected.ids) for p in strings.pairs]

    # Only the answer is scored, through the end-of-turn marker; the prompt never is.
    pair = strings.pairs[0]
    scored = tok.decode([t for t, on in zip(pair.chosen.ids, pair.chosen.targets) if on])
    assert scored == "In short, 1.<|im_end|>"
    assert tok.decode([t for t, on in zip(pair.rejected.ids, pair.rejected.targets) if on]).startswith("Let me think")
    # The same file trains SFT on the chosen answers.
    from mlxft.data import load_dataset

    sft = load_dataset(tmp_path / "s.jsonl", tok, 256)
    assert sft.samples[0].ids == pair.chosen.ids and sft.samples[0].targets == pair.chosen.targets


@pytest.mark.parametrize("row, words", [
    ({"prompt": "Hi?", "chosen": "Hello."}, "missing field 'rejected'"),
    ({"prompt": "Hi?", "chosen": "  ", "rejected": "Go away."}, "'chosen' is empty"),
    ({"prompt": "Hi?", "chosen": "Hello.", "rejected": ""}, "'rejected' is empty"),
])
def test_bad_pair_fails_in_one_line_naming_file_and_line(tiny_model_dir, tmp_path, row, words):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2] + [row] + PAIRS[2:4])
    res = CliRunner().invoke(cli, ["train", "--model", str(tiny_model_dir), "--data", str(data),
                                   "--out", str(tmp_path / "run"), "--set", "train.method=dpo"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert f"{data}:3: " in lines[-1] and words in lines[-1]
    assert not (tmp_path / "run").exists()


def pref_cmd(model, data, out, method="dpo", steps=8, extra=()):
    sets = [f"train.method={method}", f"train.steps={steps}", "train.batch_size=4", "train.learning_rate=1e-2",
            "train.eval_every=4", "train.save_every=1", "train.dtype=float32", "lora.dropout=0.1",
            "retention.enabled=false", "train.sft_weight=0", "data.replay=0", *extra]
    cmd = [sys.executable, "-m", "mlxft", "train", "--model", str(model), "--data", str(data), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_run_reports_preference_figures(tiny_model_dir, tmp_path, method):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run = tmp_path / "run"
    res = subprocess.run(pref_cmd(tiny_model_dir, data, run, method) + ["--json"], env=env(), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["verdict"]["method"] == method
    valid = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"valid"' in l]
    assert [v["step"] for v in valid] == [0, 4, 8]
    for v in valid:
        assert {"loss", "reward_margin", "reward_accuracy", "accuracy", "chosen_logp", "rejected_logp"} <= v.keys()
    if method == "dpo":
        assert valid[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy = reference at step 0
        assert valid[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
        assert valid[-1]["reward_margin"] > 0  # the held-out pairs moved toward the chosen answers
    else:
        assert not (run / "reference_logps.json").exists()
    assert valid[-1]["loss"] < valid[0]["loss"]
    assert (run / "adapter-best" / "adapter_model.safetensors").is_file()
    assert summary["verdict"]["accuracy_before"] == valid[0]["accuracy"]


def test_cached_reference_equals_fresh_with_adapter_off(tiny_model_dir, tmp_path):
    """After training, switching the trained adapter off gives the base model's log-probabilities
    again: the cache written before step 1 must match them. Both are the same f32 computation on
    the same weights (PEFT's disabled layer calls the base layer alone), so they agree to the
    float32 rounding of a summed log-probability (|sum| < 300, eps 1.2e-7: 1e-4)."""
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config
    from mlxft.preference import reference
    from mlxft.preference.data import load_pairs, split_pairs

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run = tmp_path / "run"
    res = subprocess.run(pref_cmd(tiny_model_dir, data, run), env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    cached = json.loads((run / reference.CACHE_FILE).read_text())
    cfg = build_config(str(run / "config.yaml"))
    backend = TorchBackend(cfg, device="cpu")
    backend.load(tiny_model_dir, adapter=run / "adapter", train=True)  # the trained adapter, kept separate
    train, valid = split_pairs(load_pairs(data, backend.tokenizer, cfg.train.max_seq_len), cfg.data.valid_split,
                               cfg.seed)
    for name, ds in (("train", train), ("valid", valid)):
        assert cached["fingerprints"][name] == reference.fingerprint(ds)
        fresh = reference.compute(backend, ds, batch_size=3, adapter_on=False)
        np.testing.assert_allclose(np.asarray(cached["logps"][name]), fresh, rtol=0, atol=1e-4)
        with_adapter = reference.compute(backend, ds, batch_size=3, adapter_on=True)
        assert np.abs(with_adapter - fresh).max() > 1e-2  # the adapter is trained: switching it off matters
        # and it is switched back on afterwards
        np.testing.assert_array_equal(reference.compute(backend, ds, batch_size=3, adapter_on=True), with_adapter)


@pytest.mark.parametrize("extra", [(), ("train.sft_weight=1", "data.replay=0.5")], ids=["dpo", "dpo+sft+replay"])
def test_killed_dpo_run_resumes_exactly(tiny_model_dir, tmp_path, extra):
    """Also with the SFT term and replay: the base model's replay answers (recorded into the run
    before step 1) train as NLL-only samples after the pairs, and a resumed run sees the same."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    full = tmp_path / "full"
    res = subprocess.run(pref_cmd(tiny_model_dir, data, full, extra=extra), env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    if extra:
        assert "replay: " in res.stdout + res.stderr and (full / "replay.jsonl").is_file()
    broken = tmp_path / "broken"
    proc = subprocess.Popen(pref_cmd(tiny_model_dir, data, broken, extra=extra), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(broken, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run([sys.executable, "-m", "mlxft", "train", "--resume", str(broken)], env=env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert train_losses(broken) == train_losses(full)
    for which in ("adapter", "adapter-best"):
        a, b = adapter_tensors(full / which), adapter_tensors(broken / which)
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), (which, k)


def test_data_check_flags_pair_problems(tiny_model_dir, tmp_path):
    rows = [dict(r) for r in PAIRS[:8]]
    rows[1]["rejected"] = rows[1]["chosen"].upper()  # identical after lower-casing
    rows[2]["chosen"] = "word " * 200  # cut at max_seq_len 64, while its rejected answer fits
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    valid = write_jsonl(tmp_path / "valid.jsonl", [PAIRS[5], PAIRS[12]])  # PAIRS[5]'s prompt is in train
    res = CliRunner().invoke(cli, ["data", "check", str(train), "--valid", str(valid), "--model",
                                   str(tiny_model_dir), "--max-seq-len", "64", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout if hasattr(res, "stdout") else res.output)
    pairs = report["pairs"]
    assert pairs["identical"]["pairs"] == [f"{train}:2"]
    assert pairs["chosen_truncated"]["pairs"] == [f"{train}:3"]
    assert pairs["prompt_leakage"]["pairs"] == [{"train": f"{train}:6", "valid": f"{valid}:1"}]
    assert len(report["advice"]) >= 3


def test_eval_reports_preference_accuracy_base_vs_tuned(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run = tmp_path / "run"
    subprocess.run(pref_cmd(tiny_model_dir, data, run, steps=8), check=True, env=env(), capture_output=True)
    res = CliRunner().invoke(cli, ["eval", str(run), "--data", str(data), "--backend", "torch", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout if hasattr(res, "stdout") else res.output)
    assert out["format"] == "preference" and out["pairs"] == len(PAIRS)
    assert 0 <= out["base"]["accuracy"] <= 1
    assert out["tuned"]["accuracy"] > out["base"]["accuracy"]  # 8 DPO steps at lr 1e-2 on these very pairs
    assert out["tuned"]["reward_margin"] > 0


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_recipes_run(tiny_model_dir, tmp_path, name):
    """The shipped recipes as written (their data, method and LoRA settings), on the tiny model
    for two steps; their held-out test prompts carry a judge regex."""
    import re

    from mlxft.config import RECIPES_DIR, build_config

    cfg = build_config(name)
    assert cfg.train.method == name
    res = CliRunner().invoke(cli, ["train", name, "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                                   "--set", "train.steps=2", "--set", "retention.enabled=false",
                                   "--set", "train.dtype=float32", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout if hasattr(res, "stdout") else res.output)
    assert summary["steps"] == 2 and summary["verdict"]["method"] == name
    tests = [json.loads(l) for l in (RECIPES_DIR / "data" / name / "test.jsonl").read_text().splitlines()]
    train_prompts = {json.loads(l)["prompt"] for l in (RECIPES_DIR / "data" / name / "train.jsonl").read_text().splitlines()}
    assert tests and all(re.compile(t["judge"]) and t["prompt"] not in train_prompts for t in tests)
