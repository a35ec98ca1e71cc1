"""Benchmark: mlxft's MLX backend against mlx-lm's own LoRA trainer, same model, data, settings.

    python scripts/bench_mlx.py --model PATH [--data FILE.jsonl] [--steps 20] [--batch-size 4]
    python scripts/bench_mlx.py --tiny 64x2          # build a random llama (hidden x layers) first

Both sides get the same JSONL records, the same chat template with prompt masking, LoRA targets,
rank, scale, layers, batch size, max length, optimizer and step count. mlx-lm runs as `mlx_lm lora`
does: `ChatDataset(mask_prompt=True)` inside `CacheDataset`, `mlx_lm.tuner.trainer.train` with
its own batching (`iterate_batches`, whose length sort sees CacheDataset.itemlen = the length of
the raw record, so it does not sort by tokens) and loss; mlxft runs through its shared Trainer
(length-grouped batches) and MLXBackend. Measured per side, after `--skip` warm-up steps:
tokens/s counting real tokens only (padding excluded), peak memory (mx.get_peak_memory), and the
padding fraction of the positions the model actually computed. Prints a table with ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the a model data train local adapter weight layer token river mountain green quick slow "
         "python apple metal memory batch length padding answer question helpful small large").split()


def synthetic_chat(path: Path, n: int, seed: int) -> Path:
    """Chat samples with widely varying lengths, as real instruction data has."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120)))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(args):
    from mlxft.config import Config

    cfg = Config()
    cfg.seed = args.seed
    t = cfg.train
    t.steps, t.epochs, t.batch_size, t.learning_rate = args.steps, None, args.batch_size, args.lr
    t.warmup, t.max_seq_len, t.grad_checkpoint, t.dtype = 0, args.max_seq_len, args.grad_checkpoint, args.dtype
    t.eval_every = t.save_every = 10 ** 9
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.layers = args.rank, args.alpha, args.layers
    cfg.retention.enabled = False
    return cfg


def run_mlxft(args, model_path: Path, train, valid, workdir: Path) -> dict:
    import mlx.core as mx

    from mlxft.backends.mlx_backend import MLXBackend
    from mlxft.runs import create_run
    from mlxft.trainer import Trainer

    cfg = make_cfg(args)
    backend = MLXBackend(cfg)
    backend.load(model_path)
    run = create_run(workdir / "mlxft-run", model=str(model_path), model_path=str(model_path), backend="mlx",
                     backend_reason="bench", status="running")
    steps = []
    seen = {"tokens": 0, "slots": 0}

    def timed(step, result, batches, seconds):
        steps.append({"seconds": seconds, "tokens": backend.stats["tokens"] - seen["tokens"],
                      "slots": backend.stats["slots"] - seen["slots"], "loss": result.loss})
        seen.update(tokens=backend.stats["tokens"], slots=backend.stats["slots"])
        if len(steps) == args.skip:
            mx.reset_peak_memory()

    trainer = Trainer(cfg, run, backend, train, valid, on_step=timed)
    mx.reset_peak_memory()
    trainer.train()
    return summarize("mlxft", steps, args.skip)


def run_mlx_lm(args, model_path: Path, records: list[dict], tokenizer, workdir: Path) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer as mt
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    mx.random.seed(args.seed)
    model, _ = load_model(model_path)
    if args.dtype != "auto":
        model.set_dtype(getattr(mx, args.dtype))
    model.freeze()
    block = model.layers[0]
    keys = {p for p, m in block.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and p.rsplit(".", 1)[-1] in args.targets}
    layers = args.layers or len(model.layers)
    linear_to_lora_layers(model, layers, {"rank": args.rank, "scale": args.alpha / args.rank, "dropout": 0.0,
                                          "keys": keys})
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    data = CacheDataset(create_dataset(records, tokenizer, argparse.Namespace(mask_prompt=True)))
    steps = []
    clock = {"t": None}

    def counted(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        for batch, lengths in mt.iterate_batches(dataset, batch_size, max_seq_length, loop, seed, comm_group):
            now = time.perf_counter()
            if clock["t"] is not None:  # the previous step ran (and was evaluated) since the last yield
                steps[-1]["seconds"] = now - clock["t"]
                if len(steps) == args.skip:
                    mx.reset_peak_memory()
            real = int((lengths[:, 1]).sum().item())
            steps.append({"seconds": None, "tokens": real, "slots": batch.shape[0] * (batch.shape[1] - 1)})
            clock["t"] = time.perf_counter()
            yield batch, lengths

    opt = optim.AdamW(learning_rate=args.lr, weight_decay=0.0, bias_correction=True)
    targs = mt.TrainingArgs(batch_size=args.batch_size, iters=args.steps, steps_per_report=10 ** 9,
                            steps_per_eval=10 ** 9, steps_per_save=10 ** 9, max_seq_length=args.max_seq_len,
                            adapter_file=str(workdir / "mlx-lm-adapters.safetensors"),
                            grad_checkpoint=args.grad_checkpoint)
    mx.reset_peak_memory()
    t_end = None
    mt.train(model, opt, data, None, args=targs, iterate_batches=counted)
    t_end = time.perf_counter()
    if steps and steps[-1]["seconds"] is None:
        steps[-1]["seconds"] = t_end - clock["t"]
    return summarize("mlx-lm", steps[: args.steps], args.skip)


def summarize(name: str, steps: list[dict], skip: int) -> dict:
    import mlx.core as mx

    timed = steps[skip:]
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    slots = sum(s["slots"] for s in timed)
    return {"name": name, "steps": len(timed), "seconds": seconds, "tokens": tokens,
            "tok_s": tokens / max(seconds, 1e-9), "slots_s": slots / max(seconds, 1e-9),
            "padding": 1 - tokens / max(slots, 1),
            "peak_mb": mx.get_peak_memory() / 2 ** 20}


def table(a: dict, b: dict) -> str:
    rows = [("real tokens/s (no padding)", "tok_s", "{:.1f}", True),
            ("positions/s (with padding)", "slots_s", "{:.1f}", True),
            ("padding fraction", "padding", "{:.1%}", False),
            ("peak memory (MiB)", "peak_mb", "{:.0f}", False),
            ("timed steps / seconds", None, None, None)]
    out = [f"| {'metric':<28} | {'mlxft':>12} | {'mlx-lm':>12} | {'mlxft / mlx-lm':>15} |",
           f"|{'-' * 30}|{'-' * 14}|{'-' * 14}|{'-' * 17}|"]
    for label, key, fmt, _ in rows:
        if key is None:
            out.append(f"| {label:<28} | {a['steps']:>4} / {a['seconds']:>5.1f} | {b['steps']:>4} / {b['seconds']:>5.1f} |"
                       f" {'':>15} |")
            continue
        ratio = a[key] / b[key] if b[key] else float("nan")
        out.append(f"| {label:<28} | {fmt.format(a[key]):>12} | {fmt.format(b[key]):>12} | {ratio:>14.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="HF-format or MLX-quantized model folder")
    ap.add_argument("--tiny", help="build a random llama HIDDENxLAYERS with the SmolLM2 tokenizer, e.g. 64x2")
    ap.add_argument("--data", type=Path, help="chat/completions JSONL (default: synthetic, varied lengths)")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the timing")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--layers", type=int, default=None, help="LoRA on the last N blocks (default all)")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["mlxft", "mlx-lm"], help="run one side (for separate processes)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]

    from mlxft.data import Dataset, load_dataset
    from mlxft.tokenizer import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-mlx-"))
    model_path = args.model
    if args.tiny:
        from tests.tiny import make_tiny_model_from_spec

        model_path = make_tiny_model_from_spec(work, args.tiny)
    if model_path is None:
        ap.error("give --model or --tiny")
    data = args.data or synthetic_chat(work / "train.jsonl", args.samples, args.seed)
    tok = load_tokenizer(model_path)
    train = load_dataset(data, tok, max_seq_len=args.max_seq_len)
    valid = Dataset(train.samples[:2], train.fmt, train.path)  # evaluated once, at the end, untimed
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    lengths = sorted(len(s) for s in train.samples)
    print(f"model {model_path}  data {data}: {len(train)} samples, lengths {lengths[0]}..{lengths[-1]} "
          f"(median {lengths[len(lengths) // 2]}); batch {args.batch_size}, rank {args.rank}, "
          f"layers {args.layers or 'all'}, {args.steps} steps ({args.skip} warm-up)", file=sys.stderr)
    results = {}
    if args.only != "mlx-lm":
        results["mlxft"] = run_mlxft(args, model_path, train, valid, work)
    if args.only != "mlxft":
        results["mlx-lm"] = run_mlx_lm(args, model_path, records, tok, work)
    if len(results) == 2:
        print(table(results["mlxft"], results["mlx-lm"]))
    if args.json or len(results) == 1:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
