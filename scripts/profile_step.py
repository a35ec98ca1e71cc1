"""Where one PyTorch training step spends its time: the torch profiler over mlxft's own
`TorchBackend.train_step`, each operator's self time put into one of the categories below, and
the share of the step each takes.

    frozen matmul    mm/addmm/bmm whose weight operand is a frozen base weight (forward, and the
                     backward to activations)
    lora matmul      matmuls with a rank-r operand (LoRA A/B forward, their activation and weight
                     gradients)
    attention        the softmax / SDPA kernels and the score and value matmuls (4-D bmm)
    lm head + loss   matmuls with the vocabulary dimension, log-softmax, nll
    elementwise      norms, activations, RoPE, adds, casts, copies, views
    optimizer        AdamW and gradient clipping
    overhead         the rest of the step's wall time: Python, autograd bookkeeping, data to tensors

Shares are meaningful on a loaded machine; absolute times are not (the script prints the load
average beside them). One thread by default (--threads) so it does not crowd a shared machine.

    python scripts/profile_step.py                       # SmolLM2-135M, batch 8 of quickstart data
    python scripts/profile_step.py --model PATH --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}
ATTENTION = {"aten::_softmax", "aten::_softmax_backward_data", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
LOSS = {"aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
        "aten::nll_loss_backward", "aten::tanh"}
OPTIMIZER = {"aten::_foreach_", "aten::addcdiv", "aten::addcmul", "aten::lerp", "aten::_fused_adamw",
             "aten::linalg_vector_norm", "aten::_foreach_norm"}


def categorize(event, rank: int, vocab: int) -> str:
    name = event.key if hasattr(event, "key") else event.name
    shapes = [s for s in (event.input_shapes or []) if s]
    if name in ATTENTION or name.startswith("aten::_scaled_dot_product"):
        return "attention"
    if name in LOSS:
        return "lm head + loss"
    if name in MATMULS:
        dims = {d for s in shapes for d in s}
        if vocab in dims:
            return "lm head + loss"
        if any(len(s) == 4 for s in shapes) or (name == "aten::bmm" and len(shapes[0]) == 3):
            return "attention"
        if rank in dims:
            return "lora matmul"
        return "frozen matmul"
    if any(name.startswith(p) for p in OPTIMIZER):
        return "optimizer"
    return "elementwise"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="HF-format model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--data", type=Path, default=ROOT / "recipes" / "data" / "quickstart" / "train.jsonl")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5,
                    help="unprofiled steps timed for the MFU figure (their median; one step alone moved 20%%+)")
    ap.add_argument("--compile", action="store_true", help="train.compile: the compiled step (mlxft/backends/torch_fast.py)")
    ap.add_argument("--no-fuse", action="store_true", help="PEFT's own LoRA forward (the step before fused LoRA)")
    ap.add_argument("--no-fused-loss", action="store_true",
                    help="the plain lm_head + cross-entropy (the step before mlxft/backends/torch_loss.py)")
    ap.add_argument("--top", type=int, default=12, help="also list the N most expensive operators")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import Config
    from mlxft.data import collate, load_dataset

    model = args.model
    if model is None:
        from mlxft.sources.default import default_model_path
        model = default_model_path()
    cfg = Config()
    cfg.train.dtype, cfg.lora.rank, cfg.lora.dropout = args.dtype, args.rank, 0.0
    cfg.train.compile = args.compile
    backend = TorchBackend(cfg)
    backend.load(Path(model))
    if args.no_fuse:
        for layer in backend._tuner_layers:
            vars(layer).pop("forward", None)
    if args.no_fused_loss:
        import mlxft.backends.torch_backend as torch_backend
        torch_backend.fusable_head = lambda head, cap: False
    data = load_dataset(args.data, backend.tokenizer, max_seq_len=256, mask_prompt=True)
    by_length = sorted(data.samples, key=len)
    middle = max(0, len(by_length) // 2 - args.batch_size // 2)
    samples = by_length[middle:middle + args.batch_size]  # a length-grouped batch of median length
    batch = collate(samples, backend.tokenizer.pad_token_id)
    warmup = []
    for _ in range(args.warmup):  # the first step compiles under --compile
        t = time.perf_counter()
        backend.train_step([batch], 1e-4)
        warmup.append(time.perf_counter() - t)
    from mlxft.devicebench import _torch_gflops

    ceiling = _torch_gflops(backend.dtype_name())  # measured now, at this thread count and load
    timed = []
    for _ in range(max(args.steps, 1)):
        t = time.perf_counter()
        backend.train_step([batch], 1e-4)
        timed.append(time.perf_counter() - t)
    plain_step = statistics.median(timed)
    per_token = backend.flops_per_token()
    vocab = backend._causal_lm().config.vocab_size
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        backend.train_step([batch], 1e-4)
        wall = time.perf_counter() - t
    split = defaultdict(float)
    top = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.self_cpu_time_total <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        cat = categorize(ev, args.rank, vocab)
        split[cat] += ev.self_cpu_time_total / 1e6
        top.append((ev.self_cpu_time_total / 1e6, ev.key, cat, ev.input_shapes))
    profiled = sum(split.values())
    split["overhead"] = max(wall - profiled, 0.0)
    total = max(wall, profiled)
    load = os.getloadavg()
    print(f"model {model.name if hasattr(model, 'name') else model}; {backend.dtype_name()}; batch {batch.input_ids.shape} "
          f"({batch.n_tokens} real tokens, {batch.n_targets} targets); {torch.get_num_threads()} thread(s); "
          f"compile={args.compile}, fused LoRA={not args.no_fuse}, fused loss={not args.no_fused_loss}")
    print(f"step wall {wall:.3f} s (profiler on; load average {load[0]:.1f}: absolute times are not comparable "
          f"across minutes, shares are)")
    print(f"warm-up steps (unprofiled) {', '.join(f'{w:.2f}' for w in warmup)} s")
    print(f"unprofiled steps {', '.join(f'{w:.2f}' for w in timed)} s")
    print(f"MFU of the median unprofiled step: {batch.n_tokens / plain_step:.1f} tokens/s x {per_token:.3g} FLOPs/token / "
          f"ceiling {ceiling:.1f} GFLOPS ({backend.dtype_name()} matmul, measured just before) = "
          f"{batch.n_tokens / plain_step * per_token / ceiling / 1e9:.0%}")
    print("| part | s | share |\n|---|---:|---:|")
    for cat in ("frozen matmul", "lora matmul", "attention", "lm head + loss", "elementwise", "optimizer", "overhead"):
        print(f"| {cat} | {split.get(cat, 0.0):.3f} | {split.get(cat, 0.0) / total:.0%} |")
    print(f"\ntop {args.top} operators by self time:")
    for sec, name, cat, shapes in sorted(top, reverse=True)[:args.top]:
        print(f"  {sec:8.3f} s  {name:48s} {cat:15s} {shapes}")


if __name__ == "__main__":
    main()
