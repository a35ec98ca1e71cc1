"""`mlxft doctor --check MODEL`: do the MLX and PyTorch backends compute the same model?

Loads MODEL (and a run's adapter) on both, in float32, and compares next-token logits on a fixed
text (mlxft.parity: max |difference| <= 1e-3 of the logit range). Prints the figures and the
RoPE fields mlx-lm was given; exits 1 when the bound fails.
"""

from __future__ import annotations

import json
from pathlib import Path


def check_backends(spec: str, as_json: bool) -> None:
    from mlxft import ui
    from mlxft.backends.select import module_available
    from mlxft.errors import MlxftError
    from mlxft.mlx_lm_config import mlx_lm_fields
    from mlxft.parity import BOUND, check_model
    from mlxft.sources import resolve_model

    missing = [name for name in ("torch", "peft", "mlx", "mlx_lm") if not module_available(name)]
    if missing:
        raise MlxftError(f"--check {spec}: needs both backends installed; missing {', '.join(missing)}")
    resolved = resolve_model(spec)
    config = json.loads((Path(resolved.path) / "config.json").read_text(encoding="utf-8"))
    with ui.console.status(f"Comparing MLX and PyTorch on {resolved.spec}"):
        result = check_model(resolved.path, adapter=resolved.adapter)
    parity = result["after"]
    fields = mlx_lm_fields(config).overrides
    if as_json:
        ui.emit_json({"model": resolved.spec, "path": str(resolved.path),
                      "adapter": str(resolved.adapter) if resolved.adapter else None,
                      "tokens": result["tokens"], "mlx_lm_fields": fields, **parity.as_dict()})
    else:
        ui.result(f"check    {resolved.spec} ({config.get('model_type')}): MLX vs PyTorch next-token logits, "
                  f"{result['tokens']} tokens, float32")
        ui.result(f"         max |diff| {parity.max_diff:.3g} = {parity.ratio:.2g} of the logit range "
                  f"{parity.logit_range:.3g} (bound {BOUND:g}); top token agrees at "
                  f"{parity.same_argmax:.0%} of positions")
        shown = ", ".join(f"{k} {json.dumps(v)}" for k, v in fields.items()) or "none needed"
        ui.result(f"         mlx-lm given: {shown}")
        ui.result(f"         {'same model' if parity.ok else 'DIFFERENT MODELS'}")
    if not parity.ok:
        raise MlxftError(f"--check {spec}: the MLX backend's logits differ from PyTorch's by "
                         f"{parity.ratio:.2g} of the logit range (bound {BOUND:g})")
