"""loss.png: written whole or not at all."""

from __future__ import annotations

import pytest

from mlxft.plot import save_loss_png

ROWS = [{"type": "train", "step": s, "loss": 3.0 / s} for s in range(1, 11)] + [{"type": "valid", "step": 10, "loss": 0.5}]


def test_loss_png_is_a_png(tmp_path):
    run = tmp_path / "run"
    save_loss_png(ROWS, run / "loss.png", title="t")
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in run.iterdir()] == ["loss.png"]


def test_failed_write_keeps_the_old_plot_and_no_temporary(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    target = tmp_path / "run" / "loss.png"
    save_loss_png(ROWS[:3], target)
    old = target.read_bytes()

    def half_then_fail(self, fh, **kw):
        fh.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(OSError):
        save_loss_png(ROWS, target)
    assert target.read_bytes() == old
    assert [p.name for p in target.parent.iterdir()] == ["loss.png"]
