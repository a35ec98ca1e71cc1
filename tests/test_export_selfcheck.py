"""Export checks itself: llama.cpp loads the GGUF just written and is compared with the trained
model on the run's validation conversations; a deliberately broken tokenizer key is caught and
`--strict` turns it into exit code 1; without llama.cpp the check is skipped in one line."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from tests.helpers.export import make_adapter, make_run

VALID = [{"messages": [{"role": "user", "content": f"Add {a} and {b}. WE'RE sure:\n\n   indented  line {a}"},
                       {"role": "assistant", "content": f"{a} + {b} = {a + b}; 1234567 1234567."}]}
         for a, b in [(12, 30), (345, 6789), (2026, 11), (7, 8)]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("selfcheck")
    valid = root / "valid.jsonl"
    valid.write_text("".join(json.dumps(r) + "\n" for r in VALID))
    run = make_run(root / "run", tiny_model_dir, make_adapter(tiny_model_dir, root / "adapter"))
    (run / "config.yaml").write_text(f"data:\n  train: {valid}\n  valid: {valid}\n  system_prompt: Be brief.\n")
    return run


def export(run_dir, out, *args):
    return CliRunner().invoke(cli, ["export", str(run_dir), "-o", str(out), *args])


@pytest.mark.llamacpp
def test_selfcheck_passes_then_catches_a_broken_tokenizer_key(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    res = export(run_dir, tmp_path / "ok.gguf", "--strict", "--json")
    assert res.exit_code == 0, res.output
    check = json.loads(res.stdout)["selfcheck"]
    assert check["ok"] is True and check["prompts"] == len(VALID)
    assert check["tokens"]["equal"] == check["tokens"]["total"] == 2 * len(VALID)
    # the self-check's own f16 tolerances (mlxft/export/selfcheck.py TOLERANCES): f16 rounds by
    # 2**-11 relative, which moves a random tiny model's flat distributions very little. Those roundings
    # are deterministic; only float32 summation order differs by CPU (~1e-7), which can flip a
    # top-1 only where the lead is that small.
    assert check["logits"]["mean_kl"] < 0.005 and check["logits"]["top1"] > 0.98
    assert check["stops"]["end_of_generation"] and check["stops"]["tokens"] == ["<|im_end|>"]

    # `tokenizer.ggml.pre = llama-bpe` instead of smollm: llama.cpp then splits runs of whitespace
    # and upper-case contractions differently from the tokenizer the model was trained with
    import mlxft.export.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "bpe_pre", lambda *a: "llama-bpe")
    res = export(run_dir, tmp_path / "broken.gguf", "--strict")
    assert res.exit_code == 1, res.output
    assert "self-check FAILED" in res.stdout and "(FAIL)" in res.stdout.split(";")[0]
    assert "the self-check failed (--strict)" in res.output
    assert (tmp_path / "broken.gguf").is_file()  # written, and said not to behave like the trained model


def test_selfcheck_skipped_in_one_line_without_llama_cpp(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    res = export(run_dir, tmp_path / "m.gguf", "--quant", "q8_0")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if "self-check" in line]
    assert lines == ["self-check skipped: llama.cpp is not installed (pip install llama-cpp-python)"]


@pytest.mark.llamacpp
def test_quant_auto_measures_and_writes_the_smallest_within_tolerance(run_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    res = export(run_dir, tmp_path / "auto.gguf", "--quant", "auto", "--json", "--no-check")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    auto = data["auto"]
    assert [r["quant"] for r in auto["table"]][0] == "q4_k_m" and data["quant"] == auto["chosen"]
    chosen = next(r for r in auto["table"] if r["quant"] == auto["chosen"])
    assert chosen["mean_kl"] <= auto["tolerance"] and chosen["bytes"] == data["bytes"]
    assert all(not r["within"] for r in auto["table"][:-1])  # every smaller type tried was over tolerance
    assert not list(tmp_path.glob(".auto.gguf*"))  # candidates and the intermediate are gone


def test_top1_excepts_near_ties_only():
    """A swap between two tokens 0.1 nats apart is rounding's doing and passes the q8_0 bound; a
    swap at a position with a 3-nat lead is not excused; the margin follows the type's KL bound."""
    import numpy as np

    from mlxft.export.selfcheck import TOLERANCES, compare_logits, tie_margin

    tie = tie_margin(TOLERANCES["q8_0"][0])
    assert 0.45 < tie < 0.5 and tie_margin(TOLERANCES["f16"][0]) < tie < tie_margin(TOLERANCES["q4_k_m"][0])
    ref = np.zeros((4, 8))
    ref[:2, 0], ref[:2, 1] = 5.0, 4.9      # near-ties: token 0 leads by 0.1 nats
    ref[2:, 0], ref[2:, 1] = 5.0, 2.0      # decisive: a 3-nat lead
    near = ref.copy()
    near[:2, 1] = 5.05                     # both near-ties swapped
    assert compare_logits(ref, near, tie)[1:] == (0.5, 1.0)
    far = near.copy()
    far[2, 1] = 5.5                        # and one decisive position swapped
    assert compare_logits(ref, far, tie)[1:] == (0.25, 0.75)
