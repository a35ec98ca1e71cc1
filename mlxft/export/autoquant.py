"""`--quant auto`: measure, on the run's validation text, how far each candidate type moves the
model, and write the smallest one that stays within AUTO_KL_TOLERANCE.

One unquantized GGUF is written; llama.cpp's quantizer makes q4_k_m, q5_k_m, q6_k and q8_0 from
it; each is loaded by llama.cpp and its next-token distributions compared with the trained
model's (mlxft's backend, float32) as mean KL(backend || GGUF) in nats over the validation
conversations. The candidates are tried smallest first; the first within tolerance is kept.
When none is, q8_0 (the closest) is written and the table says so.
"""

from __future__ import annotations

import os
from pathlib import Path

CANDIDATES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0")  # smallest first
AUTO_KL_TOLERANCE = 0.05  # nats per token: see docs/export.md for the figures behind it
LLAMA_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def _quantize(src: Path, dst: Path, quant: str) -> None:
    from mlxft.export.quantize import llama_quantize

    llama_quantize(src, dst, LLAMA_FTYPES[quant], quant)


def measure_kl(path: Path, engine, texts_ids: list[list[int]]) -> tuple[float, float]:
    """(mean KL, top-1 agreement) of one GGUF against the backend over the token sequences."""
    from mlxft.export.selfcheck import LlamaCpp, compare_logits

    llm = LlamaCpp(path)
    try:
        kl_sum = top1_sum = n = 0.0
        for ids in texts_ids:
            kl, top1, _ = compare_logits(engine.logits(ids), llm.logits(ids))
            kl_sum, top1_sum, n = kl_sum + kl * len(ids), top1_sum + top1 * len(ids), n + len(ids)
    finally:
        llm.close()
    return kl_sum / n, top1_sum / n


def choose_and_write(job, out: Path, engine, texts_ids: list[list[int]], on_tensor=None, status=None,
                     tolerance: float = AUTO_KL_TOLERANCE) -> dict:
    """Write `out` as the smallest candidate within `tolerance`; returns the table."""
    from mlxft.atomic import atomic_path
    from mlxft.export.quantize import require_llama_cpp
    from mlxft.fuse import check_disk_space

    require_llama_cpp("auto")
    out = Path(out)
    check_disk_space(out.parent, job.estimated_bytes() * 3, what=str(out))
    rows = []
    with atomic_path(out) as tmp:
        inter = tmp.with_name(tmp.name + f".{job.write_as}")
        made: list[Path] = [inter]
        try:
            job.write(inter, on_tensor)
            chosen = None
            for quant in CANDIDATES:
                if status is not None:
                    status.update(f"--quant auto: measuring {quant}")
                cand = tmp.with_name(tmp.name + f".{quant}")
                made.append(cand)
                _quantize(inter, cand, quant)
                kl, top1 = measure_kl(cand, engine, texts_ids)
                rows.append({"quant": quant, "bytes": cand.stat().st_size, "mean_kl": kl, "top1": top1,
                             "within": kl <= tolerance})
                if kl <= tolerance:
                    chosen = quant
                    break
            if chosen is None:
                chosen = min(rows, key=lambda r: r["mean_kl"])["quant"]
            os.replace(tmp.with_name(tmp.name + f".{chosen}"), tmp)
        finally:
            for path in made:
                if path.exists():
                    os.unlink(path)
    return {"chosen": chosen, "tolerance": tolerance, "within": any(r["within"] for r in rows), "table": rows,
            "positions": sum(len(t) for t in texts_ids)}


def table_text(auto: dict) -> str:
    lines = [f"{'type':<8} {'size MiB':>9} {'mean KL':>9} {'top-1':>7}"]
    for r in auto["table"]:
        mark = "  <- written" if r["quant"] == auto["chosen"] else ""
        lines.append(f"{r['quant']:<8} {r['bytes'] / 2**20:>9.1f} {r['mean_kl']:>9.4f} {r['top1']:>7.1%}{mark}")
    verdict = (f"smallest type within mean KL {auto['tolerance']} nats: {auto['chosen']}" if auto["within"] else
               f"no type within mean KL {auto['tolerance']} nats; wrote the closest, {auto['chosen']}")
    return "\n".join(lines + [verdict + f" ({auto['positions']} validation tokens)"])
