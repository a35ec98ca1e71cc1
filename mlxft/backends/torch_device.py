"""The PyTorch backend's device policy and figures: which device and dtype (bf16 on a CPU only
where a bf16 matmul is measured faster than f32; for generation, the weights' dtype), the folder
transformers can load (MLX-quantized weights dequantized first), and what the backend reports:
device, dtype, peak memory and the FLOPs per token for the MFU figure."""

from __future__ import annotations

from pathlib import Path

LOSS_CHUNK = 512  # target positions per lm_head chunk: 512 x 49k f32 logits = 100 MB at a time
EAGER_ATTENTION_MAX_LEN = 160  # CPU: eager attention up to this padded length, SDPA above
# Batches computed in bf16/fp16 are padded to a multiple of this many positions, so a run sees a
# few batch shapes instead of one per length: on a CPU, torch's bf16 matmuls go through oneDNN,
# which builds and keeps a kernel per shape, and replay's extra lengths fill that cache. On the
# quickstart (Intel Xeon with AMX) this took the guarded run's peak RSS from 2,203-2,223 to
# 1,832-1,842 MiB and the unguarded run's from 1,782-1,786 to 1,619-1,623 MiB at the same tokens/s
# (docs/retention.md, "Batches padded to a multiple of 16"). f32 matmuls go to MKL's sgemm, which
# keeps no such cache, so f32 batches are not padded (not measured). (MLX buckets its own: SEQ_BUCKET.)
SEQ_BUCKET_HALF = 16
# bf16 must beat f32 by this much at the matmul before it pays on a CPU: autocast's casts and
# the ops that stay f32 eat the rest. Measured whole-run ratios (bf16 over f32 speed) against the
# matmul ratio: Intel Xeon with AMX 8.1x matmul; AMD EPYC 2.1x matmul -> 1.6x run; Intel Xeon
# without AMX 0.96x matmul -> 0.76x run (docs/benchmarks.md).
BF16_MIN_SPEEDUP = 1.3


def cpu_bf16_pays() -> tuple[bool, str]:
    """Whether bf16 is measured faster than f32 on this CPU (matmul GFLOPS, cached per machine by
    mlxft.devicebench), and the figures that say so. A CPU flag alone decides nothing: CPUs with
    avx512_bf16 but no AMX compute bf16 no faster than f32."""
    from mlxft.devicebench import peak_gflops

    f32, bf16 = peak_gflops("torch", "float32", "cpu"), peak_gflops("torch", "bfloat16", "cpu")
    if not f32 or not bf16:
        return False, "bf16 speed could not be measured"
    ratio = bf16 / f32
    return ratio >= BF16_MIN_SPEEDUP, f"bf16 matmul {ratio:.1f}x f32 on this CPU"


def pick_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(requested: str, device: str):
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_pays()[0] else torch.float32


def pick_inference_weights(model, model_path, requested: str) -> tuple[str, str, bool, str]:
    """How generation holds the Linear weights, and why: (dtype, why, packed, why packed). The dtype
    is mlxft.decode.weights'; `packed` says whether steps of several rows use oneDNN-packed copies
    of the float32 weights (mlxft.decode.packed). `auto` measures both on this model's shapes and
    this CPU (cached in MLXFT_HOME/devicebench.json, so only the first load of a model of these
    shapes pays the seconds it takes) and keeps float16 only where it is no slower for a batch
    than float32 with the packed copies. Packed copies are never made where they would take more
    than a quarter of the memory free now: the KV cache of a full batch needs the rest."""
    if requested != "auto":
        return requested, "asked for", False, ""
    from mlxft.decode.packed import PROBE_ROWS, choose_packed, measure_packed, packed_bytes
    from mlxft.decode.weights import choose_weight_dtype, measure_weight_dtypes
    from mlxft.decode.weights import PROBE_ROWS as DTYPE_ROWS
    from mlxft.devicebench import cached_figure
    from mlxft.sysinfo import available_memory

    shape = _shape_key(model_path)
    seconds = cached_figure(f"decode-weights/{shape}", lambda: measure_weight_dtypes(model))
    dtype, why = choose_weight_dtype(seconds)
    why = f"auto: {why}"
    extra, free = packed_bytes(model), available_memory()
    if free is not None and extra > free // 4:
        return dtype, why, False, f"a {extra / 2**20:.0f} MiB packed copy would take over a quarter of the free memory"
    packed_seconds = cached_figure(f"decode-packed/{shape}", lambda: measure_packed(model))
    packed, packed_why = choose_packed(packed_seconds)
    if packed and dtype != "float32":
        batch = seconds[dtype][DTYPE_ROWS.index(PROBE_ROWS)]
        if batch <= packed_seconds["packed"]:
            return dtype, why, False, f"{dtype} is as fast for a batch"
        why = (f"auto: {dtype} {seconds['float32'][0] / seconds[dtype][0]:.2f}x float32's speed for one row, but "
               f"{packed_seconds['packed'] / batch:.2f}x float32's on packed weights for {PROBE_ROWS} rows")
        dtype = "float32"
    return dtype, why, packed, packed_why


def _shape_key(model_path) -> str:
    """model_type-hidden-intermediate-layers-vocab from the model's config.json."""
    import json

    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    config = config.get("text_config") or config
    return "-".join(str(config.get(k)) for k in ("model_type", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "vocab_size"))


def torch_loadable(model_path: Path) -> Path:
    try:
        from mlxft.sources.mlx_quant import torch_loadable_path
    except ImportError:
        return model_path
    return torch_loadable_path(model_path)


class TorchDeviceInfo:
    """TorchBackend's reporting methods (a mixin: it reads the backend's model and device)."""

    def device_name(self) -> str:
        if self.device == "cuda":
            return f"cuda ({self.torch.cuda.get_device_name(0)})"
        return "cpu"

    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def peak_memory(self):
        if self.device == "cuda":
            return int(self.torch.cuda.max_memory_allocated())
        return None

    def model_flops(self) -> tuple[float | None, float | None]:
        per_token = self.flops_per_token()
        if per_token is None:
            return None, None
        from mlxft.devicebench import peak_gflops

        gflops = peak_gflops("torch", self.dtype_name(), self.device)
        return per_token, gflops * 1e9 if gflops else None

    def flops_per_token(self) -> float | None:
        """Model FLOPs per trained token (see mlxft.progress): 2 x the blocks' frozen linear weights
        forward, plus 2 x those from the earliest adapted block up for activation gradients, plus
        6 x the LoRA weights (forward, activation gradient and weight gradient)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        blocks = getattr(getattr(self._causal_lm(), "model", None), "layers", None)
        if blocks is None:
            return None
        per_block, first, lora = [], None, 0
        for i, block in enumerate(blocks):
            n = 0
            for name, m in block.named_modules():
                if not isinstance(m, self.torch.nn.Linear) or isinstance(m, BaseTunerLayer):
                    pass
                elif "lora_" in name:
                    lora += m.in_features * m.out_features
                else:
                    n += m.in_features * m.out_features
                if first is None and isinstance(m, BaseTunerLayer):
                    first = i
            per_block.append(n)
        if first is None:
            return None
        return 2.0 * sum(per_block) + 2.0 * sum(per_block[first:]) + 6.0 * lora
