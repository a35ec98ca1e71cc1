"""Linear weights stored column-major for decoding on CPU.

nn.Linear keeps its weight as [out, in] and computes x @ W.T, a GEMM with a transposed operand.
For the few rows of a decode step, PyTorch's CPU GEMM was measured slower on that layout than on
x @ Wt with Wt = W.T stored contiguously: on SmolLM2-135M's shapes, float32, one thread, the
30 layers' projections took 14-15% less time at 1 and 8 rows and the 49152-word vocabulary
projection 12% less at 1 row and 43% less at 8 (docs/serve.md). `column_major(model)` rewrites each weight's storage in place to that
layout, as a transposed view (`weight.t()` is contiguous), so every module and PEFT layer still
sees an [out, in] weight and F.linear dispatches to the untransposed GEMM. No memory is added;
the values are the same, only the order of the float32 sums may change in the last bits.
"""

from __future__ import annotations


def column_major(model) -> int:
    """Store every frozen Linear weight (and a tied input embedding with it) column-major;
    returns how many were rewritten. Trainable weights keep their layout (an optimizer's state
    follows it). Idempotent."""
    import torch

    done = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if weight.requires_grad or weight.dim() != 2 or weight.t().is_contiguous():
            continue
        weight.data = weight.data.t().contiguous().t()
        done += 1
    if done:
        # The rest are copied too, so that no tensor still views the safetensors file that
        # from_pretrained mapped: while one does, the mapping stays, and the pages read to make
        # the transposed copies stay resident beside them (measured: +1 GB RSS on SmolLM2-135M).
        for tensor in (*model.parameters(), *model.buffers()):
            transposed = tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous()
            if not transposed and not tensor.requires_grad:
                tensor.data = tensor.data.clone()
    return done
