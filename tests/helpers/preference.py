"""Preference pairs for the tests: sixteen small arithmetic prompts, a brief chosen answer and a
rambling rejected one (tests/test_preference*.py)."""

import json

PAIRS = [{"prompt": f"What is {i} plus {i + 1}?", "chosen": f"In short, {2 * i + 1}.",
          "rejected": f"Let me think about {i} and {i + 1} for a while. It could be {2 * i + 2}, or not."}
         for i in range(16)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
