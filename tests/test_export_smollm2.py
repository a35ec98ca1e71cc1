"""Slow tier: GGUF export of the real SmolLM2-135M-Instruct, judged by llama.cpp against the HF
model and against the files llama.cpp's own converter (convert_hf_to_gguf.py, from the
llama-cpp-python source distribution) and quantizer make from the same folder.

Calibration: llama.cpp's own f16 keeps the top-1 next token on ~99.7% of positions; its own
q8_0 on only ~94% on this small model, so quantized files are compared by mean KL divergence
against llama.cpp's reference at the same type (ours must be within 10% of it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.export import VARIED, llama_cpp_logits, llama_cpp_model

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

HELD_TEXT = """The history of the printing press begins in the fifteenth century, when Johannes Gutenberg
combined movable metal type, oil-based ink and a wooden press adapted from wine making. Within fifty
years, presses were running in more than two hundred cities across Europe, and the price of books fell
sharply. Scholars argue about how much the new technology changed ideas, but few doubt that it changed
how quickly they travelled.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]

In a small kitchen, the recipe calls for 200 g of flour, 3 eggs and a pinch of salt. Mix the dry
ingredients first, then add the eggs one at a time, stirring until the batter is smooth. Let it rest
for thirty minutes before cooking; the pancakes will be lighter and easier to flip. Questions people
ask most often: can I use milk instead of water? Yes, and the result is richer."""


def llama_cpp_converter(cache: Path) -> Path:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (LLAMA_CPP_CONVERTER overrides)."""
    if os.environ.get("LLAMA_CPP_CONVERTER"):
        return Path(os.environ["LLAMA_CPP_CONVERTER"])
    import llama_cpp

    version = llama_cpp.__version__
    found = list(cache.glob(f"llama_cpp_python-{version}/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                          f"llama-cpp-python=={version}", "-d", str(cache)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot download the llama-cpp-python sdist for its converter: {res.stderr[-200:]}")
    import tarfile

    with tarfile.open(next(cache.glob(f"llama_cpp_python-{version}.tar.gz"))) as tar:
        tar.extractall(cache, filter="data")
    return next(cache.glob(f"llama_cpp_python-{version}/vendor/llama.cpp/convert_hf_to_gguf.py"))


@pytest.fixture(scope="module")
def converter(session_home):
    return llama_cpp_converter(Path(session_home) / "llama-cpp-src")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2-gguf")


@pytest.fixture(scope="module")
def held_ids(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir)).encode(HELD_TEXT)


@pytest.fixture(scope="module")
def source_logits(default_model_dir, held_ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([held_ids])).logits[0].numpy()


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(p || q) for next-token distributions given as logits."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def reference_gguf(converter: Path, model_dir: Path, out: Path, quant: str) -> Path:
    """llama.cpp's own file: converter straight to f16/q8_0, or f16 then llama.cpp's quantizer."""
    outtype = quant if quant in ("f16", "q8_0") else "f16"
    first = out if outtype == quant else out.with_suffix(".f16.gguf")
    subprocess.run([sys.executable, str(converter), str(model_dir), "--outfile", str(first), "--outtype", outtype],
                   check=True, capture_output=True)
    if first != out:
        from mlxft.export.quantize import kquantize

        kquantize(first, out, quant)
    return out


def test_real_model_f16_tokenizes_like_hf_and_keeps_top1(default_model_dir, work, held_ids, source_logits):
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from mlxft.export.gguf import export_model

    out = work / "smollm2-f16.gguf"
    summary = export_model(default_model_dir, None, out, "f16")
    assert summary["pre"] == "smollm" and summary["architecture"] == "llama"
    llm = llama_cpp_model(out, n_ctx=1024)
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    for text in (VARIED, HELD_TEXT, "   leading spaces\n\n\n\ttabs\r\nCRLF ﬁ ligature 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧 1234567890"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)
    got = llama_cpp_logits(llm, held_ids)
    agree = float((got.argmax(-1) == source_logits.argmax(-1)).mean())
    # f16 weights, activations and KV cache round deterministically (round to nearest) on every
    # CPU; only float32 summation order differs. A top-1 flips only at a near-tie, 1 position in
    # 100 allowed (the check passed on an Intel Xeon Sapphire Rapids and an AMD EPYC Zen 3).
    assert agree >= 0.99, f"top-1 agreement {agree:.3f}"


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_real_model_quantized_kl_no_worse_than_llama_cpp(quant, default_model_dir, work, converter, held_ids,
                                                         source_logits):
    pytest.importorskip("llama_cpp")
    from mlxft.export.gguf import export_model

    ours = work / f"ours-{quant}.gguf"
    export_model(default_model_dir, None, ours, quant)
    ref = reference_gguf(converter, default_model_dir, work / f"ref-{quant}.gguf", quant)
    kl_ours = mean_kl(source_logits, llama_cpp_logits(llama_cpp_model(ours, n_ctx=1024), held_ids))
    kl_ref = mean_kl(source_logits, llama_cpp_logits(llama_cpp_model(ref, n_ctx=1024), held_ids))
    print(f"{quant}: mean KL ours {kl_ours:.5f}, llama.cpp {kl_ref:.5f}")
    assert kl_ours <= kl_ref * 1.10, f"{quant}: KL {kl_ours:.5f} vs llama.cpp's {kl_ref:.5f}"
