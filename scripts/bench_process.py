"""Whole-process speed and memory: `mlxft train` with its defaults (retention on) against
`transformers.Trainer` + PEFT at its best dtype, on the same model, data, LoRA modules and epochs.

Every contender is one process, timed from start to exit (imports, model load, tokenization,
the retention baseline and replay answers where mlxft makes them, training, validation,
checkpoints, writing the adapter), with its peak RSS from the kernel (wait4's ru_maxrss).

    mlxft default          `mlxft train --data D --set train.epochs=E`, with the retention and
                           replay caches empty (a first run on this base model)
    mlxft default, warm    the same again, caches filled (any later run on this base)
    mlxft retention off    retention.enabled=false (the guard's own cost: baseline + scoring)
    mlxft plain            retention.enabled=false, data.replay=0, no early stopping
    mlxft compiled         plain with train.compile=true, inductor's on-disk cache empty (a
                           first compiled run on this machine)
    mlxft compiled, warm   the same again, inductor's cache filled by the run before
    trainer f32 / bf16     Trainer + PEFT: float32, and float32 weights under bf16 autocast
                           (`bf16=True`); the faster one is the peer's best setting

Where torch sees a CUDA device, every contender trains on it (mlxft's torch backend picks it,
and Trainer is not held to the CPU); the header names the GPU.

Trainer gets mlxft's tokenization (same chat template, same masked targets), LoRA r/alpha on the
same modules of every layer, the same batch size, AdamW at the learning rate mlxft chose,
cosine schedule with 5% warm-up (transformers 5 has no `group_by_length` any more), no
evaluation and no checkpoints (it does less work than mlxft's default run, which validates and
checkpoints). mlxft may stop early (its default); the tokens each contender trained are shown.

    python scripts/bench_process.py                      # quickstart data, 3 epochs, SmolLM2
    python scripts/bench_process.py --data bench/data/faq/train.jsonl --epochs 5
    python scripts/bench_process.py --base ~/.cache/mlxft/models/gemma-3-270m-...   # another model folder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# mlxft doing a peer's work: no retention guard, no replay samples, every step of the epochs
EQUAL_WORK_SETS = ["--set", "retention.enabled=false", "--set", "data.replay=0", "--set", "train.early_stop_patience=0"]


def timed(cmd: list[str], env: dict) -> tuple[float, int, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS bytes, completed process) of one child process."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(), err.read().decode())
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, rss, done


def child_summary(out_text: str) -> dict:
    """A child's JSON summary: its whole stdout (mlxft's --json), else its last JSON line (Trainer
    prints a Python dict of its own metrics before it)."""
    try:
        return json.loads(out_text)
    except ValueError:
        return json.loads([line for line in out_text.splitlines() if line.startswith('{"')][-1])


def trainer_child(args) -> None:
    """One Trainer + PEFT run; prints its trained-token count as JSON."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from mlxft.data import load_dataset
    from mlxft.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    data = load_dataset(str(args.data), tok, max_seq_len=512, mask_prompt=True)
    rows = [{"input_ids": s.ids, "labels": [i if (k and t) else -100 for k, (i, t) in enumerate(zip(s.ids, s.targets))]}
            for s in data.samples]
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    targs = TrainingArguments(
        output_dir=str(args.out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=args.trainer_dtype == "bf16",
        logging_steps=10 ** 9, save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(),  # the device mlxft's torch backend picks too
        remove_unused_columns=False, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    model.save_pretrained(str(args.out / "adapter"))
    print(json.dumps({"tokens": sum(len(s.ids) for s in data.samples) * args.epochs}))


def main() -> None:
    from mlxft.sysinfo import cpu_model, gpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "recipes" / "data" / "quickstart" / "train.jsonl")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--base", type=Path, help="a model folder to train (default: the built-in SmolLM2-135M-Instruct), "
                                              "e.g. the folder `mlxft pull` made from the Gemma 3 270M GGUF")
    ap.add_argument("--only", help="comma-separated contender keys: default,warm,noret,plain,compiled,compiled-warm,"
                                       "trainer-f32,trainer-bf16")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--trainer-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trainer-dtype", choices=["f32", "bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trainer_child:
        return trainer_child(args)

    from mlxft.defaults import auto_learning_rate
    from mlxft.paths import home
    from mlxft.sources.default import default_model_path

    model = args.base.resolve() if args.base else default_model_path()
    lr = auto_learning_rate(json.loads((model / "config.json").read_text())["hidden_size"])
    work = Path(tempfile.mkdtemp(prefix="mlxft-bench-process-"))
    # A private MLXFT_HOME sharing the imported model but not the retention/replay caches.
    bench_home = work / "home"
    bench_home.mkdir()
    (bench_home / "models").symlink_to(home() / "models")
    if (home() / "devicebench.json").exists():
        shutil.copy(home() / "devicebench.json", bench_home / "devicebench.json")
    # The compiled contenders share a private inductor cache: empty for "compiled", filled by it for
    # "compiled-warm" (run "compiled" first), never the user's.
    env = {**os.environ, "MLXFT_HOME": str(bench_home), "MLXFT_NO_PROGRESS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    mlxft = [sys.executable, "-m", "mlxft", "train", "--model", str(model), "--data", str(args.data), "--set", f"train.epochs={args.epochs}",
             "--set", f"train.batch_size={args.batch_size}", "--json"]
    contenders = {
        "default": ("mlxft default (first run, caches empty)", mlxft),
        "warm": ("mlxft default (caches filled)", mlxft),
        "noret": ("mlxft, retention.enabled=false", mlxft + ["--set", "retention.enabled=false"]),
        "plain": ("mlxft, retention off, replay 0, no early stop",
                  mlxft + EQUAL_WORK_SETS),
        "compiled": ("mlxft plain, train.compile, inductor cache empty",
                     mlxft + EQUAL_WORK_SETS + ["--set", "train.compile=true"]),
        "compiled-warm": ("mlxft plain, train.compile, inductor cache warm",
                          mlxft + EQUAL_WORK_SETS + ["--set", "train.compile=true"]),
        "trainer-f32": ("Trainer + PEFT, float32", None),
        "trainer-bf16": ("Trainer + PEFT, bf16 autocast", None),
    }
    only = args.only.split(",") if args.only else list(contenders)
    gpu = gpu_model()  # both contenders train on it when torch sees one
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), {gpu or 'no GPU'}, load average "
          f"{os.getloadavg()[0]:.2f}; model {model.name}, "
          f"data {args.data.name}, {args.epochs} epochs, batch {args.batch_size}, lr {lr:g}, LoRA r8 on {len(TARGETS)} "
          f"modules of every layer", flush=True)
    results = {}
    for key in only:
        label, cmd = contenders[key]
        out = work / key
        if cmd is None:
            cmd = [sys.executable, __file__, "--trainer-child", "--trainer-dtype", key.split("-")[1], "--model",
                   str(model), "--data", str(args.data), "--epochs", str(args.epochs), "--batch-size",
                   str(args.batch_size), "--lr", str(lr), "--out", str(out)]
        else:
            cmd = cmd + ["--out", str(out)]
        wall, rss, done = timed(cmd, env)
        out_text = done.stdout.strip()
        summary = child_summary(out_text)
        ret = (summary.get("retention") or {}).get("score") if isinstance(summary.get("retention"), dict) else None
        results[key] = {"label": label, "wall_s": round(wall, 1), "peak_rss_mib": round(rss / 2 ** 20),
                        "tokens": summary.get("tokens"), "steps": summary.get("steps"), "retention": ret,
                        "timings": summary.get("timings")}
        results[key]["load_after"] = round(os.getloadavg()[0], 2)
        print(f"  {label}: {wall:.1f} s, peak RSS {rss / 2 ** 20:.0f} MiB, tokens {summary.get('tokens')}, "
              f"load average after {os.getloadavg()[0]:.2f}"
              + (f", retention {ret:.3f}" if ret is not None else ""), flush=True)
    print("\n| contender | wall s | peak RSS MiB | tokens trained | tokens/s (whole process) | retention |"
          "\n|---|---|---|---|---|---|")
    for r in results.values():
        ret = f"{r['retention']:.3f}" if r["retention"] is not None else "-"
        tok_s = f"{r['tokens'] / r['wall_s']:.1f}" if r["tokens"] else "-"
        print(f"| {r['label']} | {r['wall_s']} | {r['peak_rss_mib']} | {r['tokens']} | {tok_s} | {ret} |")
    peers = [results[k] for k in ("trainer-f32", "trainer-bf16") if k in results]
    if peers:
        best = min(peers, key=lambda r: r["wall_s"])
        print(f"\npeer at its best: {best['label']}")
        for key in ("default", "warm", "plain", "compiled", "compiled-warm"):
            if key in results:
                r = results[key]
                print(f"{r['label']}: {best['wall_s'] / r['wall_s']:.2f}x faster, "
                      f"{r['peak_rss_mib'] / best['peak_rss_mib']:.2f}x peak RSS")
    for key in ("default", "warm"):
        if key in results and "noret" in results:
            print(f"{results[key]['label']} / retention off: {results[key]['wall_s'] / results['noret']['wall_s']:.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "gpu": gpu, "results": results}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
