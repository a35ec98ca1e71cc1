"""The PyTorch training step's fast paths: fused LoRA projections and compiled transformer blocks.

Fused LoRA (always on where it applies). PEFT's LoRA Linear computes
`result = base(x); result = result + lora_B(lora_A(dropout(x))) * scaling`: besides the three
matmuls, a multiply and an add each read and write the whole (tokens x out) output, in the forward
and again in the backward. Here the low-rank path ends in one `addmm`, which multiplies by
B, scales and adds onto the frozen product in the same kernel:

    out = addmm(x @ W.T, x @ A.T, B.T, alpha=scaling)

ordered `(x @ A.T) @ B.T` (2*T*r*(in+out) FLOPs, never the dense `A.T @ B.T`, which would cost
2*in*out*(T+r)). It applies only where it is the same computation: one active adapter, plain LoRA
(not DoRA or another variant), dropout 0 (PEFT's dropout is then an identity), not merged, no
extra forward arguments. Every other case runs PEFT's own forward.

Compiled blocks (`train.compile`, off by default; docs/benchmarks.md has the measurement that
decided it). `torch.compile` of each transformer block's forward (and, through AOTAutograd, its
backward) with dynamic shapes from the first compilation: one graph serves every block, batch
size and length, so a run compiles once (tests/test_torch_fast.py counts the graphs). The
mask, rotary tables and loss stay eager. Padding lengths into buckets would also bound the
graphs, but costs the padded positions' compute at every step and, with a compilation costing
minutes on a small CPU, several buckets cost more than one dynamic graph. Dynamo still
specialises a dimension of size 1, so a batch of one sample adds one graph.
"""

from __future__ import annotations

import types


def fusable(layer) -> bool:
    """Whether `layer` (a PEFT LoRA Linear) runs plain LoRA that the fused forward computes exactly."""
    import torch

    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return False
    return isinstance(layer.lora_A[name], torch.nn.Linear) and layer.lora_A[name].bias is None \
        and layer.lora_B[name].bias is None


def fused_lora_forward(layer, x, *args, **kwargs):
    """PEFT LoRA Linear forward with the low-rank path and its add in one addmm (see the module
    docstring); falls back to PEFT's own forward wherever that would not be the same computation."""
    import torch

    if args or kwargs or not fusable(layer):
        return type(layer).forward(layer, x, *args, **kwargs)
    name = layer.active_adapters[0]
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    base = layer.base_layer(x)
    if getattr(layer, "cast_input_dtype_enabled", True) and x.dtype != a.dtype:
        x = x.to(a.dtype)  # PEFT's input cast (off under mlxft's bf16 autocast)
    low = torch.nn.functional.linear(x, a)
    out = base.reshape(-1, base.shape[-1])
    if not torch.is_autocast_enabled(x.device.type):
        out = out.to(low.dtype)  # as PEFT's `result + lora` promotes, then casts back below
    flat = torch.addmm(out, low.reshape(-1, low.shape[-1]), b.t(), alpha=layer.scaling[name])
    return flat.reshape(base.shape).to(base.dtype)


def install_fused_lora(tuner_layers) -> int:
    """Route each PEFT LoRA Linear's forward through fused_lora_forward; returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for layer in tuner_layers:
        if type(layer) is LoraLinear:
            layer.forward = types.MethodType(fused_lora_forward, layer)
            n += 1
    return n


def compile_blocks(blocks) -> int:
    """Compile each transformer block in place (`nn.Module.compile`, inductor, dynamic shapes).
    Dynamo treats a module's parameters as inputs (inline_inbuilt_nn_modules, on by default since
    torch 2.5), so blocks of one shape share one compiled graph: compiling costs one block, not
    all of them (as torchtune compiles per layer). Returns the number of blocks."""
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
