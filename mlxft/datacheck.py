"""`mlxft data check`: what in a data set would spoil a fine-tune, found before training.

Reports, for tokenized data sets (train and validation):
  - format and sample count per file, and rows that cannot be used;
  - token lengths against train.max_seq_len (histogram), and which samples get truncated;
  - the share of tokens that carry loss under masking;
  - exact and near duplicates, and train samples that duplicate validation samples (leakage);
  - very short answers, and answers that never end (no end-of-turn/EOS token is learned);
  - one sample rendered with the trained spans highlighted;
and says what to do about each problem.

Duplicates are found by mlxft/near_duplicates.py.
"""

from __future__ import annotations

import json

from mlxft.data import Dataset
from mlxft.near_duplicates import NEAR_THRESHOLD, Item, find_duplicates, normalize

MIN_ANSWER_CHARS = 3  # answers shorter than this (after stripping) are reported as very short
SHOW = 10             # sample locations listed per finding
HIST_BINS = 8


def sample_text(record: dict, fmt: str) -> tuple[str, str]:
    """(prompt, answer) of a canonical record, normalized."""
    if fmt == "preference":  # the prompt and the chosen answer, as SFT on the pair reads it
        record, fmt = {"messages": record["prompt"] + record["chosen"]}, "chat"
    if fmt == "completions":
        return normalize(record["prompt"]), normalize(record["completion"])
    if fmt == "text":
        return "", normalize(record["text"])
    prompt, answer = [], []
    for m in record["messages"]:
        if m["role"] == "assistant":
            answer.append(m["content"])
            answer.extend(json.dumps(c["function"], sort_keys=True) for c in m.get("tool_calls", ()))
        elif m["role"] != "system":
            prompt.append(m["content"])
    return normalize("\n".join(prompt)), normalize("\n".join(answer))


def answer_texts(record: dict, fmt: str) -> list[str]:
    if fmt == "preference":
        return [m["content"] for m in record["chosen"] + record["rejected"] if not m.get("tool_calls")]
    if fmt == "completions":
        return [record["completion"]]
    if fmt == "text":
        return []
    return [m["content"] for m in record["messages"] if m["role"] == "assistant" and not m.get("tool_calls")]


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def histogram(lengths: list[int], max_seq_len: int) -> list[dict]:
    step = max(1, -(-max_seq_len // HIST_BINS))
    bins = [{"from": lo + 1 if lo else 1, "to": min(lo + step, max_seq_len), "count": 0}
            for lo in range(0, max_seq_len, step)]
    over = {"from": max_seq_len + 1, "to": None, "count": 0}
    for n in lengths:
        if n > max_seq_len:
            over["count"] += 1
        else:
            bins[min(len(bins) - 1, (max(n, 1) - 1) // step)]["count"] += 1
    return bins + [over]


def render_segments(tokenizer, ids: list[int], targets: list[bool]) -> list[dict]:
    """The sample as text in runs of trained / not trained tokens."""
    segments, run, flag = [], [], None
    for t, m in zip(ids, targets):
        if flag is not None and m != flag:
            segments.append({"text": tokenizer.decode(run), "trained": flag})
            run = []
        run.append(t)
        flag = m
    if run:
        segments.append({"text": tokenizer.decode(run), "trained": flag})
    return segments


def analyze(train: list[Dataset], valid: list[Dataset], tokenizer, max_seq_len: int) -> dict:
    """The full report (JSON-serialisable) for loaded data sets."""
    everything = train + valid
    lengths = [n for ds in everything for n in ds.full_lengths]
    ordered = sorted(lengths)
    truncated = [s.source for ds in everything for s, n in zip(ds.samples, ds.full_lengths) if n > max_seq_len]
    n_tokens = sum(len(s) for ds in everything for s in ds.samples)
    n_targets = sum(s.n_targets for ds in everything for s in ds.samples)
    from mlxft.templates import answer_end_ids

    ends = answer_end_ids(tokenizer)
    never_end, short = [], []
    for ds in everything:
        for s, record, cut in zip(ds.samples, ds.records, ds.cut):
            if cut or True not in s.targets or s.ids[len(s.targets) - 1 - s.targets[::-1].index(True)] not in ends:
                never_end.append(s.source)
            if any(len(a.strip()) < MIN_ANSWER_CHARS for a in answer_texts(record, ds.fmt)):
                short.append(s.source)
    items = lambda ds_list: [Item(s.source, *sample_text(r, ds.fmt))  # noqa: E731
                             for ds in ds_list for s, r in zip(ds.samples, ds.records)]
    dups = find_duplicates(items(train), items(valid))
    first = train[0].samples[0] if train else everything[0].samples[0]
    report = {
        "files": [{"path": ds.path, "role": "valid" if any(ds is v for v in valid) else "train", "format": ds.shape or ds.fmt,
                   "samples": len(ds), "skipped": len(ds.skipped), "skipped_first": ds.skipped[:SHOW]}
                  for ds in everything],
        "samples": len(lengths),
        "max_seq_len": max_seq_len,
        "lengths": {"min": ordered[0], "median": _percentile(ordered, 0.5), "p95": _percentile(ordered, 0.95),
                    "max": ordered[-1], "histogram": histogram(lengths, max_seq_len)},
        "truncated": {"count": len(truncated), "samples": truncated[:SHOW]},
        "loss_tokens": {"trained": n_targets, "total": n_tokens,
                        "share": round(n_targets / n_tokens, 4) if n_tokens else 0.0},
        "exact_duplicates": {"count": sum(len(g) - 1 for g in dups["exact"]), "groups": dups["exact"][:SHOW]},
        "near_duplicates": {"count": len(dups["near"]), "threshold": NEAR_THRESHOLD, "pairs": dups["near"][:SHOW]},
        "leakage": {"exact": sum(len(g["train"]) for g in dups["leak_exact"]), "near": len(dups["leak_near"]),
                    "exact_pairs": dups["leak_exact"][:SHOW], "near_pairs": dups["leak_near"][:SHOW],
                    "checked": bool(valid)},
        "short_answers": {"count": len(short), "min_chars": MIN_ANSWER_CHARS, "samples": short[:SHOW]},
        "never_end": {"count": len(never_end), "samples": never_end[:SHOW]},
        "rendered": {"source": first.source, "segments": render_segments(tokenizer, first.ids, first.targets)},
    }
    report["advice"] = advice(report)
    return report


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def advice(r: dict) -> list[str]:
    """What to do, for each finding that would hurt training."""
    out = []
    skipped = sum(f["skipped"] for f in r["files"])
    if skipped:
        out.append(f"{skipped} rows cannot be used (first: {next(f['skipped_first'][0] for f in r['files'] if f['skipped'])}); "
                   "fix them, or train with --skip-bad-lines to leave them out")
    if r["truncated"]["count"]:
        share = r["truncated"]["count"] / r["samples"]
        out.append(f"{r['truncated']['count']} samples ({share:.0%}) are longer than train.max_seq_len="
                   f"{r['max_seq_len']} and get cut; raise train.max_seq_len to about {r['lengths']['max']} "
                   "(memory grows with it) or shorten those samples")
    if r["never_end"]["count"]:
        out.append(f"{r['never_end']['count']} samples never learn to stop (no end-of-turn/EOS token is trained, "
                   "mostly because truncation cut the answer): the tuned model will ramble; raise "
                   "train.max_seq_len or drop them")
    if r["exact_duplicates"]["count"]:
        out.append(f"{_n(r['exact_duplicates']['count'], 'exact duplicate')}: they weigh those samples more and "
                   "hasten overfitting; remove the copies unless the weighting is intended")
    if r["near_duplicates"]["count"]:
        out.append(f"{_n(r['near_duplicates']['count'], 'near-duplicate pair')} (prompt and answer both >= "
                   f"{NEAR_THRESHOLD:.0%} alike): check them; keep one of each unless they differ on purpose")
    leaks = r["leakage"]["exact"] + r["leakage"]["near"]
    if leaks:
        out.append(f"{_n(leaks, 'train sample')} (near-)duplicating validation samples: validation loss will look "
                   "better than the model is; remove them from the training file")
    if r["short_answers"]["count"]:
        out.append(f"{r['short_answers']['count']} answers shorter than {MIN_ANSWER_CHARS} characters: fine for "
                   "labels or yes/no, otherwise they teach the model to answer curtly")
    share = r["loss_tokens"]["share"]
    if share < 0.05:
        out.append(f"only {share:.1%} of tokens carry loss: long prompts and short answers make slow, noisy "
                   "training; shorten the prompts, or raise train.batch_size")
    return out


# ---------------------------------------------------------------------------- output


def print_report(r: dict) -> None:
    """The full report, readable, on stdout."""
    from rich.console import Console
    from rich.text import Text

    out = Console(highlight=False, soft_wrap=True)
    for f in r["files"]:
        extra = f", {f['skipped']} rows unusable" if f["skipped"] else ""
        out.print(f"[bold]{f['path']}[/bold]  {f['role']}  {f['format']}  {f['samples']} samples{extra}")
    ln = r["lengths"]
    out.print(f"\n[bold]Token lengths[/bold] (train.max_seq_len={r['max_seq_len']}): min {ln['min']}, "
              f"median {ln['median']}, p95 {ln['p95']}, max {ln['max']}")
    peak = max(b["count"] for b in ln["histogram"]) or 1
    for b in ln["histogram"]:
        label = f"{b['from']:>6}-{b['to']:<6}" if b["to"] else f"{'>' + str(b['from'] - 1):>13}"
        bar = "█" * round(28 * b["count"] / peak)
        out.print(f"  {label} {bar:<28} {b['count']}", style="red" if b["to"] is None and b["count"] else None)
    _listing(out, "Truncated", r["truncated"]["count"], r["truncated"]["samples"])
    lt = r["loss_tokens"]
    out.print(f"[bold]Loss[/bold] on {lt['trained']:,} of {lt['total']:,} tokens ({lt['share']:.1%})")
    ex = r["exact_duplicates"]
    _listing(out, "Exact duplicates", ex["count"], [" = ".join(g[:4]) for g in ex["groups"]])
    nd = r["near_duplicates"]
    _listing(out, f"Near duplicates (>= {nd['threshold']:.0%} alike)", nd["count"],
             [f"{p['a']} ~ {p['b']} ({p['similarity']:.2f})" for p in nd["pairs"]])
    lk = r["leakage"]
    if lk["checked"]:
        _listing(out, "Leakage train -> valid", lk["exact"] + lk["near"],
                 [f"{', '.join(p['train'][:3])} = {', '.join(p['valid'][:3])}" for p in lk["exact_pairs"]]
                 + [f"{p['train']} ~ {p['valid']} ({p['similarity']:.2f})" for p in lk["near_pairs"]])
    else:
        out.print("[bold]Leakage[/bold]: no validation file given (train holds out data.valid_split at random; "
                  "duplicates above would leak across it)")
    _listing(out, f"Very short answers (< {MIN_ANSWER_CHARS} chars)", r["short_answers"]["count"],
             r["short_answers"]["samples"])
    _listing(out, "Answers that never end", r["never_end"]["count"], r["never_end"]["samples"])
    plain = out.color_system is None  # piped or NO_COLOR: mark the trained spans with brackets
    legend = "trained spans between ⟦ ⟧" if plain else "[reverse green]trained[/reverse green], [dim]not trained[/dim]"
    out.print(f"\n[bold]Rendered sample[/bold] {r['rendered']['source']} ({legend}):")
    text = Text()
    for seg in r["rendered"]["segments"]:
        if plain:
            text.append(f"⟦{seg['text']}⟧" if seg["trained"] else seg["text"])
        else:
            text.append(seg["text"], style="reverse green" if seg["trained"] else "dim")
    out.print(text)
    out.print()
    if r["advice"]:
        out.print("[bold yellow]To do:[/bold yellow]")
        for line in r["advice"]:
            out.print(f"  - {line}")
    else:
        out.print("[bold green]No problems found.[/bold green]")


def _listing(out, title: str, count: int, examples: list[str]) -> None:
    out.print(f"[bold]{title}[/bold]: {count or 'none'}")
    for e in examples[:SHOW]:
        out.print(f"    {e}")


def brief(r: dict) -> list[str]:
    """The short form printed at the start of `mlxft train`."""
    ln, lt = r["lengths"], r["loss_tokens"]
    head = (f"data check: {r['samples']} samples ({', '.join(sorted({f['format'] for f in r['files']}))}); "
            f"tokens median {ln['median']}, max {ln['max']} of max_seq_len {r['max_seq_len']}; "
            f"loss on {lt['share']:.0%} of tokens")
    if not r["advice"]:
        return [head + "; no duplicates, leakage or truncation"]
    return [head] + r["advice"]


def report_at_train_start(train: Dataset, valid: Dataset, tokenizer, max_seq_len: int) -> None:
    """The short data check `mlxft train` prints (stderr) before training."""
    from mlxft import ui

    lines = brief(analyze([train], [valid], tokenizer, max_seq_len))
    ui.info(lines[0])
    for line in lines[1:]:
        ui.warn(line)
