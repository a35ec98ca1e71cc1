"""A preference-tuned run leaves the same adapter files as an SFT run, so export and serve take it
unchanged: a DPO run on the tiny model, exported to GGUF, answers greedily in llama.cpp with the
same text as the run answers through `mlxft generate`, and `mlxft serve` answers with it too.

Greedy text is compared token for token. That is exact only where the top token leads the
runner-up by more than the export can move them: an f32 export's logits stay within 0.002 of the
logits' range of PyTorch's (llama.cpp's f16 KV cache; tests/test_export_gguf.py), so each of the
two can move by that and the lead must exceed twice it (LEAD_OF_RANGE). The run is trained (DPO
with its SFT term) until it answers in the chosen style, which gives its tokens such leads; the
test checks the lead at every token, so a tie could not pass by luck."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from tests.helpers.export import llama_cpp_model
from tests.helpers.preference import PAIRS, write_jsonl
from tests.helpers.resume import env

pytest.importorskip("torch")
pytest.importorskip("peft")

PROMPT = PAIRS[3]["prompt"]
MAX_TOKENS = 12
LEAD_OF_RANGE = 2 * 0.002


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("dpo-export")
    data = write_jsonl(work / "pairs.jsonl", PAIRS)
    run = work / "run"
    sets = ["train.method=dpo", "train.sft_weight=1", "train.steps=60", "train.batch_size=4",
            "train.learning_rate=2e-2", "train.eval_every=20", "train.dtype=float32", "lora.dropout=0",
            "retention.enabled=false", "data.replay=0"]
    cmd = [sys.executable, "-m", "mlxft", "train", "--model", str(tiny_model_dir), "--data", str(data),
           "--out", str(run), "--backend", "torch"]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return run


def _run_answer(run) -> tuple[list[int], list[int], str]:
    """(prompt ids, greedy answer ids, text) of the run's chosen adapter, as `mlxft generate`."""
    from mlxft.inference import format_prompt, load_for_inference, run_system_prompt

    engine, resolved = load_for_inference(str(run), backend="torch")
    ids = list(format_prompt(engine.tokenizer, PROMPT, system=run_system_prompt(resolved)))
    out = [int(t) for t in engine.generate_batch([ids], MAX_TOKENS)[0]]
    return ids, out, engine.tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.llamacpp
def test_dpo_run_exports_to_gguf_with_the_same_greedy_text(dpo_run, tmp_path):
    pytest.importorskip("llama_cpp")
    gguf = tmp_path / "dpo.gguf"
    res = CliRunner().invoke(cli, ["export", str(dpo_run), "-o", str(gguf), "--quant", "f32", "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["adapter_merged"].endswith("adapter-best")
    # the export's own self-check ran on the run's held-out pairs (their prompts and chosen answers)
    assert result["selfcheck"]["ok"] is True, result["selfcheck"]

    prompt_ids, answer_ids, text = _run_answer(dpo_run)
    assert text.startswith("In short,"), text  # the preference was learned: the chosen style
    llm = llama_cpp_model(gguf)
    llm.reset()
    llm.eval(prompt_ids)
    theirs, eos, tied = [], llm.token_eos(), False
    for _ in range(MAX_TOKENS):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] <= LEAD_OF_RANGE * np.abs(logits).max():
            tied = True  # a near-tie: float32 rounding in either runtime may pick either token
            break
        token = int(logits.argmax())
        if token == eos:
            break
        theirs.append(token)
        llm.eval([token])
    ours = [t for t in answer_ids if t != eos]
    if tied:  # the same text up to the near-tie, and that text already shows the learned style
        assert theirs == ours[:len(theirs)], (theirs, answer_ids)
        assert llm.detokenize(theirs).decode().startswith("In short,"), theirs
    else:
        assert theirs == ours, (theirs, answer_ids)


def test_dpo_run_serves_the_run_text(dpo_run):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from mlxft.serve.engine import Engine
    from tests.helpers.serve import _InProcess

    _, _, text = _run_answer(dpo_run)
    with _InProcess(Engine([str(dpo_run)], backend="torch")) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        reply = client.chat.completions.create(model=dpo_run.name, messages=[{"role": "user", "content": PROMPT}],
                                               temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == text
