"""What `mlxft data check` (and the start of a dpo/orpo run) finds in preference pairs:

  - identical pairs: chosen and rejected the same text (after lower-casing and collapsing
    whitespace), which teach nothing and only add noise to the margin;
  - chosen cut, rejected not: truncation at train.max_seq_len removed scored tokens of the chosen
    answer but none of the rejected, so the model is taught to prefer an answer that never ends;
  - prompts shared between train and valid: held-out preference accuracy then measures recall
    of training prompts, not a preference that carries over.
"""

from __future__ import annotations

import re

from mlxft.preference.data import PairDataset

SHOW = 10
_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip()


def _text(messages: list[dict]) -> str:
    return _norm("\n".join(m.get("content") or "" for m in messages if m["role"] != "system"))


def pair_findings(train: list[PairDataset], valid: list[PairDataset]) -> dict:
    identical, chosen_cut = [], []
    for ds in train + valid:
        for pair, record, cut in zip(ds.pairs, ds.records, ds.cut):
            if _text(record["chosen"]) == _text(record["rejected"]):
                identical.append(pair.source)
            if cut[0] and not cut[1]:
                chosen_cut.append(pair.source)
    valid_prompts: dict[str, str] = {}
    for ds in valid:
        for pair, record in zip(ds.pairs, ds.records):
            valid_prompts.setdefault(_text(record["prompt"]), pair.source)
    leaks = [{"train": pair.source, "valid": valid_prompts[_text(record["prompt"])]}
             for ds in train for pair, record in zip(ds.pairs, ds.records) if _text(record["prompt"]) in valid_prompts]
    return {"pairs": sum(len(ds) for ds in train + valid),
            "identical": {"count": len(identical), "pairs": identical[:SHOW]},
            "chosen_truncated": {"count": len(chosen_cut), "pairs": chosen_cut[:SHOW]},
            "prompt_leakage": {"count": len(leaks), "pairs": leaks[:SHOW], "checked": bool(valid)}}


def pair_advice(f: dict) -> list[str]:
    out = []
    if f["identical"]["count"]:
        out.append(f"{f['identical']['count']} pairs have identical chosen and rejected answers (first: "
                   f"{f['identical']['pairs'][0]}): they teach no preference; remove them")
    if f["chosen_truncated"]["count"]:
        out.append(f"{f['chosen_truncated']['count']} chosen answers are cut by train.max_seq_len while their rejected "
                   f"answer is not (first: {f['chosen_truncated']['pairs'][0]}): the model learns to prefer "
                   "answers that never end; raise train.max_seq_len or shorten them")
    if f["prompt_leakage"]["count"]:
        first = f["prompt_leakage"]["pairs"][0]
        out.append(f"{f['prompt_leakage']['count']} train prompts also appear in validation (first: {first['train']} = "
                   f"{first['valid']}): held-out preference accuracy will look better than it is; keep each prompt "
                   "on one side")
    return out


def report_pairs_at_train_start(train: PairDataset, valid: PairDataset, tokenizer) -> None:
    from mlxft import ui

    f = pair_findings([train], [valid])
    problems = pair_advice(f)
    ui.info(f"pair check: {len(train)} train / {len(valid)} valid pairs"
            + ("" if problems else "; no identical pairs, one-sided truncation or prompt leakage"))
    for line in problems:
        ui.warn(line)


def add_to_report(report: dict, train_files, valid_files, tokenizer, cfg) -> None:
    """`mlxft data check` on preference files: the pair findings under "pairs", their advice first."""
    from mlxft.preference.data import load_pairs

    kw = dict(max_seq_len=cfg.train.max_seq_len, system_prompt=cfg.data.system_prompt, skip_bad_lines=True,
              columns=cfg.data.columns, limit=cfg.data.limit)
    train = [load_pairs(f, tokenizer, split=cfg.data.split, **kw) for f in train_files]
    valid = [load_pairs(f, tokenizer, **kw) for f in valid_files]
    report["pairs"] = pair_findings(train, valid)
    report["advice"] = pair_advice(report["pairs"]) + report["advice"]
