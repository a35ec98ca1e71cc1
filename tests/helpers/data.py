"""Small data files and rows that several test files write."""

from __future__ import annotations

import json


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ROWS = [{"messages": [{"role": "user", "content": f"What is code {i}?"},
                      {"role": "assistant", "content": f"Code {i} is {'alpha bravo charlie'.split()[i % 3]}."}]}
        for i in range(24)]
