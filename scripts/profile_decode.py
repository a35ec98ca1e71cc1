"""Where the time of one PyTorch decode step goes: mlxft's continuous-batching decoder
(mlxft.decode.torch_decoder) on a model, at each batch size and dtype asked for, timed over a few
greedy tokens and then profiled with torch.profiler. Ops are grouped into matmul, attention,
KV-cache handling, sampling and other tensor ops; what the profiler does not see in any op is
Python (transformers' module calls, the decoder's own bookkeeping) and dispatch overhead.

    python scripts/profile_decode.py [MODEL] --batch 1,8 --dtype float32,bfloat16 --threads 1 --tokens 24

MODEL defaults to the built-in SmolLM2-135M-Instruct. Figures are per decode step (one token for
every row); tokens/s counts every row's token.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GROUPS = (  # first match wins; the op names are ATen's
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "onednn")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::baddbmm")),
    ("kv cache", ("aten::cat", "aten::copy_", "aten::zeros", "aten::slice", "aten::index", "aten::select",
                  "aten::fill_", "aten::empty", "aten::as_strided")),
    ("sampling", ("aten::argmax", "aten::max", "aten::topk", "aten::multinomial")),
)


def group_of(name: str) -> str:
    for group, needles in GROUPS:
        if any(n in name for n in needles):
            return group
    return "other ops"


def load(model_path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), use_safetensors=True)
    model.eval().requires_grad_(False)
    return model


def prompts(tokenizer, batch: int) -> list[list[int]]:
    topics = ("rivers", "mountains", "bread", "trains", "bees", "clocks", "maps", "violins",
              "tea", "glass", "winter", "robots", "islands", "paper", "bridges", "owls")
    texts = [f"Tell me about {topics[i % 16]}." for i in range(batch)]
    if not tokenizer.chat_template:  # a base model (Gemma 3 270M): the plain text
        return [tokenizer(t)["input_ids"] for t in texts]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def decoder_with_rows(model, ids: list[list[int]], tokens: int):
    """A decoder holding every prompt as a prefilled row, ready to decode `tokens` more tokens."""
    from mlxft.decode.base import SeqRequest
    from mlxft.decode.torch_decoder import TorchDecoder

    decoder = TorchDecoder(model)
    for i, prompt in enumerate(ids):
        decoder.insert(SeqRequest(i, prompt, max_tokens=tokens + 2))
    while decoder.pending:
        decoder.step()
    return decoder


def measure(model, ids: list[list[int]], tokens: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    decoder = decoder_with_rows(model, ids, 2 * tokens + 2)
    decoder.step()  # warm up
    t0 = time.perf_counter()
    for _ in range(tokens):
        decoder.step()
    step_s = (time.perf_counter() - t0) / tokens
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(tokens):
            decoder.step()
    del torch
    profiled = {}
    for event in prof.key_averages():
        group = group_of(event.key)
        profiled[group] = profiled.get(group, 0.0) + event.self_cpu_time_total / 1e6 / tokens
    return {"step_s": step_s, "groups": profiled}


def main() -> None:
    import torch

    from mlxft.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=24, help="decode steps timed (and as many profiled)")
    ap.add_argument("--layout", default="rows,columns,packed",
                    help="comma-separated weight layouts: rows (nn.Linear's own), columns (mlxft.decode.layout), "
                         "packed (columns, and oneDNN-packed copies for two or more rows: mlxft.decode.packed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        path = args.model
    else:
        from mlxft.sources import resolve_model

        path = str(resolve_model(None).path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    print(f"profile_decode: {Path(path).name}; {args.threads} torch thread(s); CPU: {cpu_model()} "
          f"({os.cpu_count()} cores); load average {os.getloadavg()[0]:.2f}")
    names = [g for g, _ in GROUPS] + ["other ops", "python+dispatch"]
    print(f"{'dtype':>9} {'layout':>7} {'batch':>5} {'ms/step':>8} {'tok/s':>7}  " + " ".join(f"{n:>15}" for n in names))
    from mlxft.decode.layout import column_major
    from mlxft.decode.packed import pack_linear_weights

    for dtype, layout in ((d, l) for d in args.dtype.split(",") for l in args.layout.split(",")):
        model = load(path, dtype)
        if layout in ("columns", "packed"):
            column_major(model)
        if layout == "packed":
            pack_linear_weights(model)
        for batch in (int(b) for b in args.batch.split(",")):
            r = measure(model, prompts(tokenizer, batch), args.tokens)
            step = r["step_s"]
            groups = r["groups"]
            groups["python+dispatch"] = max(0.0, step - sum(groups.values()))
            cells = " ".join(f"{1e3 * groups.get(n, 0):>8.1f} ({100 * groups.get(n, 0) / step:>3.0f}%)" for n in names)
            print(f"{dtype:>9} {layout:>7} {batch:>5} {1e3 * step:>8.1f} {batch / step:>7.1f}  {cells}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
