"""Loss curves: a PNG in the run directory, and a small chart in the terminal."""

from __future__ import annotations

from pathlib import Path


def split_metrics(rows: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(r["step"], r["loss"]) for r in rows if r.get("type") == "train"]
    valid = [(r["step"], r["loss"]) for r in rows if r.get("type") == "valid"]
    return train, valid


def save_loss_png(rows: list[dict], path: Path, title: str = "") -> None:
    """Write loss.png atomically (a temporary file renamed over it): an old plot stays whole
    when drawing or writing fails."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    from mlxft.atomic import atomic_file

    train, valid = split_metrics(rows)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as fh:
        fig.savefig(fh, format="png")


def terminal_chart(points: list[tuple[int, float]], width: int = 60, height: int = 12) -> str:
    """A plain-text line chart of (step, value) points."""
    if not points:
        return "(no points)"
    xs, ys = zip(*points)
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    grid = [[" "] * width for _ in range(height)]
    x0, x1 = min(xs), max(xs)
    for x, y in points:
        col = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (width - 1))
        row = height - 1 - round((y - lo) / span * (height - 1))
        grid[row][col] = "•"
    lines = []
    for i, row in enumerate(grid):
        label = hi - span * i / (height - 1)
        lines.append(f"{label:8.3f} │{''.join(row)}")
    lines.append(" " * 9 + "└" + "─" * width)
    lines.append(" " * 10 + f"{x0}".ljust(width - len(str(x1))) + f"{x1}")
    return "\n".join(lines)
