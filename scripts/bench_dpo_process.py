"""Whole-process speed and memory of DPO: `mlxft train --set train.method=dpo` against TRL's
DPOTrainer with a PEFT LoRA, on the same model, pairs, LoRA modules, rank, batch size, epochs,
learning rate and beta. TRL runs at float32 and at bf16 autocast (`bf16=True`); the faster is
the peer at its best dtype on this CPU.

Every contender is one process, timed from start to exit, with its peak RSS from the kernel
(wait4's ru_maxrss). TRL runs with its defaults otherwise: the reference is the same model with
the adapter disabled, run at every step (precompute_ref_log_probs=False), no evaluation, no
checkpoints. mlxft runs with its defaults (retention guard, replay of the base model's answers,
the SFT term) and with TRL's work (retention, replay, the SFT term and early stopping off); it
also validates on held-out pairs and checkpoints, which TRL here does not.

    python scripts/bench_dpo_process.py                  # recipes/data/dpo, 3 epochs, SmolLM2
    python scripts/bench_dpo_process.py --only mlxft-noret,trl-f32 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_process import EQUAL_WORK_SETS, TARGETS, timed  # noqa: E402

DATA = ROOT / "mlxft" / "recipes" / "data" / "dpo"


def trl_child(args) -> None:
    """One DPOTrainer + PEFT run; prints its trained-token count as JSON."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from mlxft.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    # Conversational form, so TRL renders them with the chat template as mlxft does.
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    targs = DPOConfig(output_dir=str(args.out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
                      learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, max_grad_norm=1.0,
                      beta=0.1, max_length=256, bf16=args.trl_dtype == "bf16", logging_steps=10 ** 9,
                      save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                      dataset_num_proc=None)
    trainer = DPOTrainer(model=model, args=targs, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft)
    trainer.train()
    trainer.model.save_pretrained(str(args.out / "adapter"))
    print(json.dumps({"tokens": int(trainer._total_train_tokens), "steps": int(trainer.state.global_step)}))


def main() -> None:
    from mlxft.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA / "train.jsonl")
    ap.add_argument("--valid", type=Path, default=DATA / "valid.jsonl")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", help="comma-separated contender keys: mlxft,mlxft-noret,trl-f32,trl-bf16")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trl-dtype", choices=["f32", "bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_child:
        return trl_child(args)

    from mlxft.defaults import auto_learning_rate
    from mlxft.paths import home
    from mlxft.preference.setup import DPO_LR_FACTOR
    from mlxft.sources.default import default_model_path

    model = default_model_path()
    lr = auto_learning_rate(json.loads((model / "config.json").read_text())["hidden_size"]) * DPO_LR_FACTOR
    work = Path(tempfile.mkdtemp(prefix="mlxft-bench-dpo-"))
    bench_home = work / "home"
    bench_home.mkdir()
    (bench_home / "models").symlink_to(home() / "models")
    if (home() / "devicebench.json").exists():
        shutil.copy(home() / "devicebench.json", bench_home / "devicebench.json")
    env = {**os.environ, "MLXFT_HOME": str(bench_home), "MLXFT_NO_PROGRESS": "1"}
    mlxft = [sys.executable, "-m", "mlxft", "train", "--data", str(args.data), "--set", f"data.valid={args.valid}",
             "--set", "train.method=dpo", "--set", f"train.epochs={args.epochs}", "--set",
             f"train.batch_size={args.batch_size}", "--set", "train.max_seq_len=256", "--json"]
    contenders = {
        "mlxft": ("mlxft dpo, defaults (retention on)", mlxft),
        # TRL's work: plain sigmoid DPO on the pairs alone (no replay samples, no SFT term), every
        # step of the epochs (no early stopping)
        "mlxft-noret": ("mlxft dpo, retention off, replay 0, sft_weight 0, no early stop",
                        mlxft + EQUAL_WORK_SETS + ["--set", "train.sft_weight=0"]),
        "trl-f32": ("TRL DPOTrainer + PEFT, float32", None),
        "trl-bf16": ("TRL DPOTrainer + PEFT, bf16 autocast", None),
    }
    only = args.only.split(",") if args.only else list(contenders)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.2f}; "
          f"data {args.data}, {args.epochs} epochs, batch {args.batch_size} pairs, lr {lr:g}, beta 0.1, LoRA r8 on "
          f"{len(TARGETS)} modules of every layer", flush=True)
    results = {}
    for key in only:
        label, cmd = contenders[key]
        out = work / key
        if cmd is None:
            cmd = [sys.executable, __file__, "--trl-child", "--trl-dtype", key.split("-")[1], "--model", str(model),
                   "--data", str(args.data), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                   "--lr", str(lr), "--out", str(out)]
        else:
            cmd = cmd + ["--out", str(out)]
        wall, rss, done = timed(cmd, env)
        out_text = done.stdout.strip()
        # mlxft prints one indented JSON object; the TRL child ends with one JSON line (Trainer
        # prints its own dict of figures before it).
        summary = json.loads(out_text if key.startswith("mlxft") else out_text.splitlines()[-1])
        ret = (summary.get("retention") or {}).get("score") if isinstance(summary.get("retention"), dict) else None
        results[key] = {"label": label, "wall_s": round(wall, 1), "peak_rss_mib": round(rss / 2 ** 20),
                        "tokens": summary.get("tokens"), "steps": summary.get("steps"), "retention": ret,
                        "timings": summary.get("timings")}
        print(f"  {label}: {wall:.1f} s, peak RSS {rss / 2 ** 20:.0f} MiB, steps {summary.get('steps')}, "
              f"tokens {summary.get('tokens')}" + (f", retention {ret:.3f}" if ret is not None else ""), flush=True)
    print("\n| contender | wall s | peak RSS MiB | steps | tokens | retention |\n|---|---|---|---|---|---|")
    for r in results.values():
        ret = f"{r['retention']:.3f}" if r["retention"] is not None else "-"
        print(f"| {r['label']} | {r['wall_s']} | {r['peak_rss_mib']} | {r['steps']} | {r['tokens']} | {ret} |")
    peers = [results[k] for k in ("trl-f32", "trl-bf16") if k in results]
    if peers:
        best = min(peers, key=lambda r: r["wall_s"])
        print(f"\npeer at its best: {best['label']}")
        for key in ("mlxft", "mlxft-noret"):
            if key in results:
                r = results[key]
                print(f"{r['label']}: {best['wall_s'] / r['wall_s']:.2f}x faster, "
                      f"{r['peak_rss_mib'] / best['peak_rss_mib']:.2f}x peak RSS")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "results": results}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
