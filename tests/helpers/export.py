"""Pieces the export, fuse and self-check tests share: reference logits from transformers (with PEFT)
and llama.cpp, a PEFT adapter with non-zero weights, and a run folder around it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

VARIED = ("def f(x):\n    return {'a': x**2}  # 🚀🦙 ok\n\n\t\t  tabs   and    spaces\n"
          "café naïve Ångström déjà vu — «quotes» 日本語のテキスト 中文字符 한국어 12345 3.14159 "
          "I'll don't WE'RE <|im_start|>user\nhi<|im_end|>\n")
PROMPT = "The capital of France is Paris. def add(a, b): return a + b  # 12 + 30 = 42"


def hf_logits(model_dir: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_cpp_model(path: Path, lora: Path | None = None, n_ctx: int = 512):
    from mlxft.export.selfcheck import load_llama  # without the AMX repacking that crashes here

    kw = {"lora_path": str(lora)} if lora else {}
    return load_llama(path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0, **kw)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def make_adapter(model_dir: Path, out: Path, *, dora: bool = False, seed: int = 1, targets=None) -> Path:
    """A PEFT adapter with non-zero lora_B (what a trained adapter looks like)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora))
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.08)
        if "magnitude" in name:
            p.data.mul_(1.1)
    peft_model.save_pretrained(str(out))
    return out


def make_run(run_dir: Path, base: Path, adapter: Path, system_prompt: str | None = None) -> Path:
    from mlxft.runs import create_run

    create_run(run_dir, model=str(base), model_path=str(base))
    shutil.copytree(adapter, run_dir / "adapter-best")
    if system_prompt:
        (run_dir / "config.yaml").write_text(f"data:\n  system_prompt: {json.dumps(system_prompt)}\n")
    return run_dir
