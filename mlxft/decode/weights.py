"""16-bit Linear weights for generation on the PyTorch backend, activations kept in float32.

A decode step reads every weight once per token, and on a CPU the step is bound by that read:
SmolLM2-135M's projections and its 49152-word output layer are 540 MB in float32. Stored in
float16 or bfloat16 they are half that; how much faster a step runs then depends on the CPU's
16-bit kernels and the number of rows (on an AMD EPYC Zen 5, float16 was faster at one row and
slower at eight, docs/serve.md). Only the Linear weights change: each projection casts its
float32 input to the weights' dtype, multiplies, and hands float32 back, so the residual stream,
norms, attention softmax and sampling stay float32 (as llama.cpp keeps f32 activations next to
f16 weights). A tied output layer gets its own 16-bit copy; the input embedding stays float32.

A run's adapter is merged into the float32 weights first and rounded once, as `mlxft export
--quant f16/bf16` writes it. `--dtype auto` measures a decode step of the model itself in float32
and float16 at one row and at eight (cached per model shape and CPU) and takes float16 only where
it is no slower at either: a CPU flag decides nothing, and one dtype for every batch size keeps
`serve`, `generate` and `chat` giving the same text.
"""

from __future__ import annotations

_CLASSES: dict = {}


def _sixteen_bit_linear():
    """nn.Linear whose forward casts the input to the weight's dtype and the output back. A
    subclass, so PEFT can still wrap it when the server switches adapters in."""
    if "linear" not in _CLASSES:
        import torch
        import torch.nn.functional as F

        class SixteenBitLinear(torch.nn.Linear):
            def forward(self, x):
                return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

        _CLASSES["linear"] = SixteenBitLinear
    return _CLASSES["linear"]


def store_linear_weights(model, dtype) -> int:
    """Give every frozen nn.Linear of `model` its weight (and bias) in `dtype`, as new row-major
    tensors, so a weight tied to the input embedding leaves the embedding float32. Returns how
    many were converted. Trainable weights are left alone. Row-major, not mlxft.decode.layout's
    column-major: PyTorch's CPU 16-bit kernels were measured several times slower on that layout
    (docs/serve.md)."""
    import torch

    cls = _sixteen_bit_linear()
    done = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad:
            continue
        module.weight = torch.nn.Parameter(module.weight.detach().to(dtype, memory_format=torch.contiguous_format),
                                           requires_grad=False)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        module.__class__ = cls
        done += 1
    return done


WEIGHT_DTYPES = ("auto", "float32", "bfloat16", "float16")
PROBE_ROWS = (1, 8)  # one stream, and a server's batch
MIN_SPEEDUP = 1.15   # a 16-bit dtype must be this much faster than float32 at one of PROBE_ROWS
PROBE_STEPS = 4      # timed decode steps per dtype and row count (after one untimed each)
PROBE_PROMPT = 16    # tokens of context each probe row has


def measure_weight_dtypes(model) -> dict[str, list[float]]:
    """Seconds per decode step at each of PROBE_ROWS with the Linear weights in float32 and in
    float16 (auto's only candidate: choose_weight_dtype), through the real decoder
    (mlxft.decode.torch_decoder) with rows of PROBE_PROMPT tokens of context. The two dtypes
    take turns step by step on one decoder (the KV cache is float32 either way), so a load that
    comes and goes weighs on both alike; each figure is the best of PROBE_STEPS. `model` ends
    as it began."""
    import torch

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    f32 = [(m.weight, m.bias) for m in linears]
    store_linear_weights(model, torch.float16)
    f16 = [(m.weight, m.bias) for m in linears]
    kinds = {"float32": (torch.nn.Linear, f32), "float16": (_sixteen_bit_linear(), f16)}

    def use(name):
        cls, params = kinds[name]
        for m, (weight, bias) in zip(linears, params):
            m.__class__, m.weight, m.bias = cls, weight, bias

    seconds = {name: [] for name in kinds}
    try:
        for rows in PROBE_ROWS:
            best = best_step_seconds(model, rows, {name: (lambda n=name: use(n)) for name in kinds})
            for name in kinds:
                seconds[name].append(best[name])
    except RuntimeError:  # no float16 kernel in this build of PyTorch for this CPU
        return {"float32": []}
    finally:
        use("float32")
    return seconds


def best_step_seconds(model, rows: int, variants: dict) -> dict[str, float]:
    """The best of PROBE_STEPS decode-step times of `rows` rows of PROBE_PROMPT tokens of context,
    through the real decoder (mlxft.decode.torch_decoder), for each variant: `variants` maps a
    name to a callable that switches `model` to it. The variants take turns step by step on one
    decoder, so a load that comes and goes weighs on all alike; the first turn warms them up."""
    import time

    from mlxft.decode.base import SeqRequest
    from mlxft.decode.torch_decoder import TorchDecoder

    decoder = TorchDecoder(model)
    for uid in range(rows):
        prompt = [(uid + i) % 100 + 1 for i in range(PROBE_PROMPT)]
        decoder.insert(SeqRequest(uid, prompt, 2 * PROBE_STEPS + 4))
    best = dict.fromkeys(variants, float("inf"))
    for turn in range(PROBE_STEPS + 1):
        for name in (variants if turn % 2 else reversed(list(variants))):
            variants[name]()
            while decoder.pending:  # prefill (untimed), then one decode step per turn
                decoder.step()
            start = time.perf_counter()
            decoder.step()
            if turn:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def choose_weight_dtype(seconds: dict[str, list[float]]) -> tuple[str, str]:
    """(dtype, the reason in words) from measure_weight_dtypes' figures. Only float16 is a
    candidate: it keeps 11 significant bits, as llama.cpp's f16 GGUF does, and on SmolLM2-135M
    its greedy answers equalled float32's on 8 prompts of 8, where bfloat16's (8 bits) equalled
    3 (docs/serve.md). One dtype serves every batch size, so that `serve`, `generate` and `chat`
    give the same text: float16 is chosen only when it is no slower than float32 at any of
    PROBE_ROWS and MIN_SPEEDUP faster at one of them."""
    f32 = seconds["float32"]
    rows = "/".join(str(r) for r in PROBE_ROWS)
    shown = ", ".join(f"{d} {'/'.join(f'{a / b:.2f}x' for a, b in zip(f32, s))}"
                      for d, s in seconds.items() if d != "float32")
    f16 = seconds.get("float16")
    if not f16:
        return "float32", "float16 weights do not run on this CPU"
    speedup = [a / b for a, b in zip(f32, f16)]
    if min(speedup) >= 1.0 and max(speedup) >= MIN_SPEEDUP:
        return "float16", f"decode at {rows} rows against float32 here: {shown}"
    return "float32", f"float16 weights are not faster at every batch size ({rows} rows) here: {shown}"
