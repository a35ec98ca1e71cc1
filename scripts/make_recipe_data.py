"""Builds the example data of the completions and plain-text recipes from the quickstart's
made-up bicycle-shop facts (scripts/make_quickstart_data.py):

    recipes/data/completions/{train,valid}.jsonl   {"prompt": "Q: question\\nA:", "completion": " answer"}
    recipes/data/pretrain/{train,valid}.jsonl      {"text": a paragraph of several facts}

Validation questions are the quickstart's held-out phrasings; validation paragraphs are fact
combinations that no training paragraph has. Run: python scripts/make_recipe_data.py"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_quickstart_data import FACTS  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "mlxft" / "recipes" / "data"


def write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    rng = random.Random(11)
    train = [{"prompt": f"Q: {q}\nA:", "completion": " " + answer} for answer, asks, _ in FACTS for q in asks]
    valid = [{"prompt": f"Q: {q}\nA:", "completion": " " + answer} for answer, _, held in FACTS for q in held]
    rng.shuffle(train)
    write(OUT / "completions", "train", train)
    write(OUT / "completions", "valid", valid)

    answers = [answer for answer, _, _ in FACTS]
    seen, paragraphs = set(), []
    while len(paragraphs) < 48:
        pick = tuple(sorted(rng.sample(range(len(answers)), 4)))
        if pick not in seen:
            seen.add(pick)
            order = list(pick)
            rng.shuffle(order)
            paragraphs.append({"text": " ".join(answers[i] for i in order)})
    write(OUT / "pretrain", "train", paragraphs[:40])
    write(OUT / "pretrain", "valid", paragraphs[40:])
    print(f"completions: {len(train)} train, {len(valid)} valid; pretrain: 40 train, 8 valid -> {OUT}")


if __name__ == "__main__":
    main()
