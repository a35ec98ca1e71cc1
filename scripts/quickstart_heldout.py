"""The quickstart's held-out figure: how many of recipes/data/quickstart/test.jsonl's questions a
run answers right. Training never reads test.jsonl (it validates, stops early and keeps its
adapter on valid.jsonl), so this is the honest figure for phrasings it has not seen.

An answer counts when it states the fact's key terms (all of them, case-insensitive), greedily
generated, at most 48 tokens:

    python scripts/quickstart_heldout.py runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

TEST = Path(__file__).resolve().parent.parent / "recipes" / "data" / "quickstart" / "test.jsonl"

# The key terms of each answer of scripts/make_quickstart_data.py, by a word that only its answer has.
KEYS = {
    "founded": ["2011", "Marta Lindqvist"],
    "Juniper": ["42 Juniper Lane"],
    "Tuesday": ["Tuesday", "Saturday", "9 am", "6 pm"],
    "555-0142": ["555-0142"],
    "Heron": ["Heron"],
    "flat tire": ["12 dollars"],
    "Sprocket": ["Sprocket"],
    "Renting": ["25 dollars"],
    "warranty": ["lifetime"],
    "safety class": ["first Saturday"],
}


def keys_of(reference: str) -> list[str]:
    for word, keys in KEYS.items():
        if word in reference:
            return keys
    raise SystemExit(f"{TEST}: no key terms for the answer {reference!r}; add them to KEYS")


def main() -> None:
    from mlxft.inference import format_prompt, load_for_inference, run_system_prompt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory (its kept adapter answers)")
    args = ap.parse_args()
    rows = [json.loads(line) for line in TEST.read_text().splitlines() if line.strip()]
    engine, resolved = load_for_inference(args.run)
    system = run_system_prompt(resolved)
    questions = [r["messages"][0]["content"] for r in rows]
    outs = engine.generate_batch([format_prompt(engine.tokenizer, q, system=system) for q in questions], 48)
    right = 0
    for row, question, out in zip(rows, questions, outs):
        answer = engine.tokenizer.decode(out, skip_special_tokens=True).strip()
        ok = all(k.casefold() in answer.casefold() for k in keys_of(row["messages"][1]["content"]))
        right += ok
        print(f"{'right' if ok else 'wrong'}: {question} -> {answer[:100]!r}")
    print(json.dumps({"run": args.run, "right": right, "questions": len(rows),
                      "load_average": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
