"""Frozen float32 Linear weights also held in oneDNN's packed layout, for decode steps of several
rows on a CPU.

PyTorch's default CPU GEMM runs the few-row products of a batched decode step poorly: on an AMD
EPYC with AVX2, SmolLM2-135M, an 8-row step took 158 ms at one thread and 180 ms at two (the
second thread went unused at 8 rows), against 75 ms for one row. oneDNN's inner-product kernel
on a weight reordered once into its own blocked layout (torch.ops.mkldnn, the kernel inductor's
CPU freezing pass uses) took the 8-row step to 118 and 95 ms; one row ran slower on it (75 -> 90
ms). So a PackedLinear multiplies one row with its dense weight, as before, and two or more with
the packed copy (docs/serve.md has the figures). The copy doubles the Linear weights' memory, so
it is made only where a measurement on this model and CPU says it pays (`measure_packed`,
`choose_packed`; cached like the weight dtype's).

A row's output from the packed product stays within float32 rounding of the dense product
whichever rows share its batch (tests/test_decode_packed.py; measured bitwise equal on one CPU).
Against the dense one-row product the sums may round differently in the last bits, as they
already did between PyTorch's own kernels for 1 and 8 rows.
"""

from __future__ import annotations

_CLASSES: dict = {}
PROBE_ROWS = 8        # a server's batch
MIN_SPEEDUP = 1.15    # packed must be this much faster at PROBE_ROWS rows to be kept


def _packed_linear():
    if "linear" not in _CLASSES:
        import torch
        import torch.nn.functional as F

        class PackedLinear(torch.nn.Linear):
            """nn.Linear that multiplies two or more rows with `packed_weight` (oneDNN's layout of
            the same values). A subclass, so code that reads `.weight` sees the dense weight."""

            def forward(self, x):
                rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
                if rows < 2 or not self.use_packed or torch.is_grad_enabled():
                    return F.linear(x, self.weight, self.bias)
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self.packed_weight,
                                                       self.bias, "none", [None], "")
                return y.reshape(*x.shape[:-1], y.shape[-1])

        _CLASSES["linear"] = PackedLinear
    return _CLASSES["linear"]


def _packable(module) -> bool:
    """A frozen float32 nn.Linear (not a subclass: 16-bit and PEFT layers keep their own forward)."""
    import torch

    return (type(module) is torch.nn.Linear and not module.weight.requires_grad
            and module.weight.dtype == torch.float32)


def pack_linear_weights(model) -> int:
    """Give every frozen float32 nn.Linear of `model` a packed copy of its weight; returns how many.
    Raises RuntimeError (or AttributeError) where this PyTorch build has no oneDNN inner product."""
    import torch

    cls = _packed_linear()
    done = 0
    for module in filter(_packable, model.modules()):
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().contiguous(), None)
        module.use_packed = True
        module.__class__ = cls
        done += 1
    return done


def unpack_linear_weights(model) -> None:
    """Undo pack_linear_weights: plain nn.Linear again, the packed copies freed."""
    import torch

    cls = _packed_linear()
    for module in model.modules():
        if type(module) is cls:
            del module.packed_weight, module.use_packed
            module.__class__ = torch.nn.Linear


def _use_packed(model, on: bool) -> None:
    cls = _packed_linear()
    for module in model.modules():
        if type(module) is cls:
            module.use_packed = on


def measure_packed(model) -> dict[str, float]:
    """Seconds per decode step of PROBE_ROWS rows on the dense and on the packed weights, the two
    taking turns on one decoder (mlxft.decode.weights.best_step_seconds, as the dtype probe does).
    Packs the model for the measurement and leaves it unpacked; {} where this build cannot pack."""
    from mlxft.decode.weights import best_step_seconds

    try:
        pack_linear_weights(model)
    except (RuntimeError, AttributeError):
        unpack_linear_weights(model)
        return {}
    try:
        return best_step_seconds(model, PROBE_ROWS, {"dense": lambda: _use_packed(model, False),
                                                     "packed": lambda: _use_packed(model, True)})
    except RuntimeError:  # a kernel this build lacks for these shapes
        return {}
    finally:
        unpack_linear_weights(model)


def packed_bytes(model) -> int:
    """What pack_linear_weights would add: the bytes of the frozen float32 Linear weights."""
    return sum(m.weight.numel() * 4 for m in filter(_packable, model.modules()))


def choose_packed(seconds: dict[str, float]) -> tuple[bool, str]:
    """(pack?, the reason in words) from measure_packed's figures."""
    if not seconds:
        return False, "oneDNN's packed weights do not run on this build"
    speedup = seconds["dense"] / seconds["packed"]
    return speedup >= MIN_SPEEDUP, f"{PROBE_ROWS}-row decode step {speedup:.2f}x on packed weights here"
