"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio x the peak."""

from __future__ import annotations

import math


def warmup_steps(warmup: float, total: int) -> int:
    return int(warmup) if warmup >= 1 else int(round(warmup * total))


def learning_rate(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """LR for optimizer step `step` (1-based)."""
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
