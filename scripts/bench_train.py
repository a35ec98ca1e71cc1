"""Training benchmark: mlxft's PyTorch backend against `transformers.Trainer` + PEFT (the peer most
users would pick), and with --mlx mlxft's MLX backend against mlx-lm's own tuner.

    python scripts/bench_train.py                         # SmolLM2-135M default, quickstart data
    python scripts/bench_train.py --tiny 64x2 --steps 3 --skip 1 --mlx     # smoke run, all four

Every contender gets the same model, JSONL records (tokenized once by mlxft: same chat template,
same prompt masking, same target tokens), max length, LoRA rank/alpha/targets/layers, batch size,
optimizer (AdamW, same lr/betas/eps/weight decay, clipping at 1.0), warm-up, step count and seed,
and each runs in its own subprocess so peak RSS is per contender. What differs is each tool's own
choice, and is reported rather than hidden: batching (mlxft groups by length, or packs with
--packing; Trainer pads each random batch to its longest sample with DataCollatorForSeq2Seq),
the dtype policy (mlxft: bf16 frozen base where the CPU/GPU computes bf16 natively, f32 LoRA;
Trainer: f32 weights under `bf16=True`, i.e. bf16 autocast, where the same test passes), and the
loss computation (mlxft: only at target positions, in chunks; Trainer: full logits).

Measured per contender, after --skip warm-up steps: trained tokens/s (real tokens, padding
excluded; the time from the end of step `skip` to the end of the last step, data preparation
included), the wall time of the whole process (imports, load, train), peak RSS of the process
(ru_maxrss), peak device memory where there is a device, the padding fraction of the positions
computed, the final training loss (mean per-target loss of the last 5 steps; batches differ between
contenders, so compare it loosely) and, for the PyTorch contenders, the validation loss after
training (--valid, default the quickstart valid.jsonl: each sample alone, mean loss per target
token, in the dtype the contender trained with; untimed). Prints a markdown table and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STARTED = time.perf_counter()

CONTENDERS = {
    "mlxft-torch": "mlxft, PyTorch backend",
    "mlxft-torch-packed": "mlxft, PyTorch backend, packing",
    "trainer": "transformers.Trainer + PEFT",
    "mlxft-mlx": "mlxft, MLX backend",
    "mlx-lm": "mlx-lm tuner (mlx_lm.lora)",
}
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# ---------------------------------------------------------------------------- shared pieces


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load_samples(args, model_path: Path):
    from mlxft.data import load_dataset
    from mlxft.tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    return tok, load_dataset(args.data, tok, max_seq_len=args.max_seq_len, mask_prompt=True)


def result(name: str, steps: list[dict], args, **extra) -> dict:
    """steps: one dict per optimizer step with its end time `t`, `tokens`, `slots`, `loss`."""
    timed = steps[args.skip:]
    seconds = steps[-1]["t"] - steps[args.skip - 1]["t"] if args.skip else steps[-1]["t"] - extra.pop("t0")
    extra.pop("t0", None)
    tokens, slots = sum(s["tokens"] for s in timed), sum(s["slots"] for s in timed)
    tail = [s["loss"] for s in steps[-5:] if s.get("loss") is not None]
    row = {"name": name, "label": CONTENDERS[name], "steps": len(steps), "timed_steps": len(timed),
           "seconds": seconds, "tokens": tokens, "tok_s": tokens / max(seconds, 1e-9),
           "padding": 1 - tokens / max(slots, 1), "final_loss": sum(tail) / len(tail) if tail else None,
           "wall_s": time.perf_counter() - STARTED}
    row.update(extra)  # wall_s: imports + load + training, before the untimed validation pass
    row["peak_rss"] = peak_rss()
    return row


def valid_samples(args, model_path: Path):
    from mlxft.data import load_dataset
    from mlxft.tokenizer import load_tokenizer

    if not args.valid or not Path(args.valid).is_file():
        return []
    return load_dataset(args.valid, load_tokenizer(model_path), max_seq_len=args.max_seq_len).samples


def mlxft_cfg(args, packing: bool = False):
    from mlxft.config import Config

    cfg = Config()
    cfg.seed = args.seed
    t = cfg.train
    t.steps, t.epochs, t.batch_size, t.learning_rate = args.steps, None, args.batch_size, args.lr
    t.warmup, t.max_seq_len, t.grad_checkpoint, t.packing = args.warmup, args.max_seq_len, args.grad_checkpoint, packing
    t.eval_every = t.save_every = 10 ** 9
    t.weight_decay, t.max_grad_norm = 0.0, 1.0
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.layers, cfg.lora.dropout = args.rank, args.alpha, args.layers, 0.0
    cfg.lora.targets = list(args.targets)
    cfg.retention.enabled = False
    return cfg


# ---------------------------------------------------------------------------- contenders


def run_mlxft_torch(args, model_path: Path, work: Path, packing: bool) -> dict:
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.data import Dataset, collate
    from mlxft.runs import create_run
    from mlxft.trainer import Trainer

    cfg = mlxft_cfg(args, packing)
    backend = TorchBackend(cfg)
    backend.load(model_path)
    _, train = load_samples(args, model_path)
    valid = Dataset(train.samples[:1], train.fmt, train.path)  # evaluated once after the last step, untimed
    run = create_run(work / "run", model=str(model_path), model_path=str(model_path), backend="torch",
                     backend_reason="bench", status="running")
    steps = []

    def timed(step, res, batches, seconds):
        steps.append({"t": time.perf_counter(), "tokens": sum(b.n_tokens for b in batches),
                      "slots": sum(b.n_slots for b in batches), "loss": res.loss})

    trainer = Trainer(cfg, run, backend, train, valid, on_step=timed)
    t0 = time.perf_counter()
    trainer.train()
    trainable, _ = backend.trainable_parameters()
    wall = time.perf_counter() - STARTED
    loss_sum = n = 0
    for s in valid_samples(args, model_path):
        r = backend.eval_batch(collate([s], backend.tokenizer.pad_token_id))
        loss_sum, n = loss_sum + r.loss_sum, n + r.n_targets
    return result("mlxft-torch-packed" if packing else "mlxft-torch", steps, args, t0=t0, wall_s=wall,
                  valid_loss=loss_sum / n if n else None,
                  peak_device=backend.peak_memory(), dtype=f"{backend.dtype_name()} base, float32 LoRA",
                  trainable=trainable, device=backend.device_name())


def run_trainer(args, model_path: Path, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from mlxft.backends.torch_device import cpu_bf16_pays

    cuda = torch.cuda.is_available()
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_bf16_pays()[0]
    tok, train = load_samples(args, model_path)
    rows = [{"input_ids": s.ids, "labels": [i if (k and t) else -100 for k, (i, t) in enumerate(zip(s.ids, s.targets))]}
            for s in train.samples]
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.config.use_cache = False
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers)) if args.layers and args.layers < n_layers else None
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules=list(args.targets), layers_to_transform=layers,
                                             bias="none", task_type="CAUSAL_LM"))
    steps, pending = [], {}

    class Timed(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            pending.update(tokens=int(inputs["attention_mask"].sum()), slots=int(inputs["input_ids"].numel()),
                           loss=float(loss))
            return loss

    class StepEnd(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            steps.append({"t": time.perf_counter(), **pending})

    targs = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=args.warmup,
        optim="adamw_torch", bf16=bf16, seed=args.seed, data_seed=args.seed, logging_steps=10 ** 9,
        save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0,
        gradient_checkpointing=args.grad_checkpoint, use_cpu=not cuda, remove_unused_columns=False,
        disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Timed(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[StepEnd()])
    t0 = time.perf_counter()
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wall = time.perf_counter() - STARTED
    loss_sum = n = 0
    model.eval()
    for s in valid_samples(args, model_path):
        ids = torch.tensor([s.ids], device=model.device)
        target = torch.tensor(s.targets[1:], device=model.device)
        ctx = torch.autocast(model.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            logits = model(input_ids=ids).logits[0, :-1].float()
        tok = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        loss_sum, n = loss_sum + float(tok[target].sum()), n + int(target.sum())
    return result("trainer", steps, args, t0=t0, wall_s=wall, valid_loss=loss_sum / n if n else None,
                  peak_device=int(torch.cuda.max_memory_allocated()) if cuda else None,
                  dtype="float32 weights, bf16 autocast (bf16=True)" if bf16 else "float32",
                  trainable=trainable, device="cuda" if cuda else "cpu")


def _mlx_args(args) -> argparse.Namespace:
    return argparse.Namespace(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              max_seq_len=args.max_seq_len, grad_checkpoint=args.grad_checkpoint, dtype="auto",
                              rank=args.rank, alpha=args.alpha, layers=args.layers, skip=args.skip,
                              targets=list(args.targets))


def run_mlx(args, model_path: Path, work: Path, which: str) -> dict:
    """Both MLX sides through scripts/bench_mlx.py (its timing excludes data preparation)."""
    import bench_mlx

    from mlxft.data import Dataset

    margs = _mlx_args(args)
    if which == "mlxft-mlx":
        _, train = load_samples(args, model_path)
        r = bench_mlx.run_mlxft(margs, model_path, train, Dataset(train.samples[:1], train.fmt, train.path), work)
    else:
        tok, _ = load_samples(args, model_path)
        records = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
        r = bench_mlx.run_mlx_lm(margs, model_path, records, tok, work)
    return {"name": which, "label": CONTENDERS[which], "steps": args.steps, "timed_steps": r["steps"],
            "seconds": r["seconds"], "tokens": r["tokens"], "tok_s": r["tok_s"], "padding": r["padding"],
            "final_loss": None, "wall_s": time.perf_counter() - STARTED, "peak_rss": peak_rss(),
            "peak_device": int(r["peak_mb"] * 2 ** 20), "dtype": "model dtype (auto)", "device": "mlx"}


# ---------------------------------------------------------------------------- parent


def fmt_mib(n) -> str:
    return "-" if not n else f"{n / 2 ** 20:,.0f}"


def table(results: dict[str, dict]) -> str:
    lines = ["| contender | tokens/s | train s | wall s | peak RSS MiB | peak device MiB | padding | final loss "
             "| valid loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        loss, val = ("-" if r.get(k) is None else f"{r[k]:.3f}" for k in ("final_loss", "valid_loss"))
        lines.append(f"| {r['label']} | {r['tok_s']:.1f} | {r['seconds']:.1f} | {r['wall_s']:.1f} | "
                     f"{fmt_mib(r['peak_rss'])} | {fmt_mib(r.get('peak_device'))} | {r['padding']:.1%} | {loss} "
                     f"| {val} |")
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> list[str]:
    out = []
    for ours, peer in (("mlxft-torch", "trainer"), ("mlxft-torch-packed", "trainer"), ("mlxft-mlx", "mlx-lm")):
        if ours in results and peer in results:
            a, b = results[ours], results[peer]
            out.append(f"{a['label']} / {b['label']}: tokens/s {a['tok_s'] / b['tok_s']:.2f}x, "
                       f"peak RSS {a['peak_rss'] / b['peak_rss']:.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF-format model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tiny", help="build a random llama HIDDENxLAYERS with the SmolLM2 tokenizer, e.g. 64x2")
    ap.add_argument("--data", type=Path, default=ROOT / "recipes" / "data" / "quickstart" / "train.jsonl")
    ap.add_argument("--valid", type=Path, default=ROOT / "recipes" / "data" / "quickstart" / "valid.jsonl",
                    help="validation JSONL scored after training (PyTorch contenders)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of tokens/s")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--layers", type=int, default=None, help="LoRA on the last N blocks (default all)")
    ap.add_argument("--targets", default=TARGETS)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps of the learning rate")
    ap.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing for every contender")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packing", action="store_true", help="also run mlxft's PyTorch backend with packing")
    ap.add_argument("--mlx", action="store_true", help="also run mlxft's MLX backend and mlx-lm (slow on CPU: "
                    "use a tiny model)")
    ap.add_argument("--only", help="comma-separated contenders to run: " + ", ".join(CONTENDERS))
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--child", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.child:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model_path = args.model
    if args.tiny:
        from tests.tiny import make_tiny_model_from_spec

        model_path = make_tiny_model_from_spec(work, args.tiny)
    elif model_path is None:
        from mlxft.sources.default import default_model_path

        model_path = default_model_path()
    names = ["mlxft-torch"] + (["mlxft-torch-packed"] if args.packing else []) + ["trainer"]
    if args.mlx:
        names += ["mlxft-mlx", "mlx-lm"]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONTENDERS]
        if unknown:
            ap.error(f"--only: unknown contender(s) {', '.join(unknown)}")
    print(f"model {model_path}\ndata {args.data}; batch {args.batch_size}, max_seq_len {args.max_seq_len}, "
          f"LoRA r={args.rank} alpha={args.alpha} on {','.join(args.targets)} of {args.layers or 'all'} layers, "
          f"{args.steps} steps ({args.skip} warm-up), lr {args.lr}, seed {args.seed}"
          f"{', gradient checkpointing' if args.grad_checkpoint else ''}", file=sys.stderr)
    passthrough = [a for a in sys.argv[1:]]
    results = {}
    for name in names:
        out = work / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--child", name, "--out", str(out),
               "--model-path", str(model_path)]
        env = {**os.environ, "MLXFT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
        print(f"running {CONTENDERS[name]} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, cwd=str(work))
        if proc.returncode != 0 or not out.is_file():
            print(f"{name}: failed (exit {proc.returncode})", file=sys.stderr)
            continue
        results[name] = json.loads(out.read_text())
        r = results[name]
        print(f"  {r['tok_s']:.1f} tok/s, {r['seconds']:.1f} s timed, peak RSS {fmt_mib(r['peak_rss'])} MiB",
              file=sys.stderr, flush=True)
    print(table(results))
    for line in ratios(results):
        print(f"\n{line}", end="")
    print()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def child(args) -> None:
    os.environ.setdefault("MLXFT_NO_PROGRESS", "1")
    from mlxft.ui import quiet_libraries

    quiet_libraries()
    model_path, work = args.model_path, args.out.parent / f"work-{args.child}"
    work.mkdir(parents=True, exist_ok=True)
    if args.child in ("mlxft-torch", "mlxft-torch-packed"):
        r = run_mlxft_torch(args, model_path, work, packing=args.child.endswith("packed"))
    elif args.child == "trainer":
        r = run_trainer(args, model_path, work)
    else:
        sys.path.insert(0, str(ROOT / "scripts"))
        r = run_mlx(args, model_path, work, args.child)
    args.out.write_text(json.dumps(r))


if __name__ == "__main__":
    main()
