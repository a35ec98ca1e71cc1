"""The GGUF writer: an HF model folder (plus an optional adapter, merged per tensor on the fly)
-> one GGUF file that llama.cpp, Ollama and LM Studio load; or the adapter alone as a GGUF LoRA.

Streaming: every tensor's GGUF name, shape and type is planned from the safetensors headers
first (so an unsupported model or type is refused before a byte is written); then the header,
metadata and tensor table are written, then tensor data one tensor at a time. Peak memory is
about one float32 tensor plus the vocabulary, not the model.

Types f32/f16/bf16/q8_0/q4_0/q4_1/q5_0/q5_1 are produced here with gguf-py's NumPy quantizers;
1-D tensors and norms stay F32. K-quants go through llama.cpp's own quantizer (quantize.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.errors import MlxftError, ModelError
from mlxft.export import archs
from mlxft.export.quantize import KQUANTS, kquantize

IN_PROCESS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
ALL_TYPES = IN_PROCESS + tuple(KQUANTS)


def _types():
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (F.ALL_F32, Q.F32), "f16": (F.MOSTLY_F16, Q.F16), "bf16": (F.MOSTLY_BF16, Q.BF16),
            "q8_0": (F.MOSTLY_Q8_0, Q.Q8_0), "q4_0": (F.MOSTLY_Q4_0, Q.Q4_0), "q4_1": (F.MOSTLY_Q4_1, Q.Q4_1),
            "q5_0": (F.MOSTLY_Q5_0, Q.Q5_0), "q5_1": (F.MOSTLY_Q5_1, Q.Q5_1)}


def check_quant(quant: str) -> str:
    quant = quant.lower()
    if quant not in ALL_TYPES:
        raise MlxftError(f"--quant: unknown type '{quant}'", f"choose from {', '.join(ALL_TYPES)}")
    return quant


@dataclass
class Planned:
    gguf_name: str
    source: str            # HF tensor name, or the GGUF name for generated tensors
    shape: tuple           # NumPy order (rows last = ne[0])
    qtype: object          # gguf.GGMLQuantizationType
    nbytes: int


def tensor_nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def choose_type(gguf_name: str, shape: tuple, base, has_output: bool):
    """Type of one tensor: F32 for 1-D and norms; Q8_0 for the output matrix (or the tied
    embedding) under 4/5-bit types, as llama.cpp keeps it at higher precision; F16 when a row
    does not split into quantization blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    qtype = base
    is_output = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output)
    if is_output and base in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        qtype = Q.Q8_0
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        qtype = Q.F16
    return qtype


class GGUFExport:
    """Plan, then write, one model (base + optional adapter) as GGUF."""

    def __init__(self, model_dir: Path, adapter: Path | None, quant: str, run_dir: Path | None = None,
                 system: str | None = None):
        from mlxft.fuse import FusedTensors

        self.quant = "auto" if quant == "auto" else check_quant(quant)
        self.model_dir = Path(model_dir)
        self.adapter = adapter
        self.tensors = FusedTensors(self.model_dir, adapter)
        self.config = self.tensors.config
        self.arch = archs.arch_for(self.config, str(self.model_dir / "config.json"))
        if self.quant in KQUANTS or self.quant == "auto":
            # llama.cpp quantizes from an unquantized GGUF: F32 when it is small, else F16/BF16
            est = sum(int(np.prod(self.tensors.shape(n))) for n in self.tensors.names()) * 4
            src = self.tensors.source_dtype("model.embed_tokens.weight") if "model.embed_tokens.weight" in self.tensors.names() else "F32"
            self.write_as = "f32" if est < (4 << 30) else ("bf16" if src == "BF16" else "f16")
        else:
            self.write_as = self.quant
        self.ftype, base = _types()[self.write_as]
        self.plan = self._plan(base)
        embed = next((p for p in self.plan if p.gguf_name == "token_embd.weight"), None)
        if embed is None:
            raise ModelError(f"{self.model_dir}: no model.embed_tokens.weight tensor")
        from mlxft.export.tokenizer import Vocab

        self.vocab = Vocab(self.model_dir, embed.shape[0], self.arch.gguf)
        self.chat = chat_for_export(self.vocab, run_dir, system)

    def _plan(self, base) -> list[Planned]:
        names = self.tensors.names()
        tied = bool(self.config.get("tie_word_embeddings", False))
        mapped = []
        for hf in names:
            g = archs.gguf_tensor_name(self.arch, hf)
            if g is None or (g == "output.weight" and tied):
                continue
            mapped.append((g, hf, tuple(self.tensors.shape(hf))))
        for g, arr in archs.extra_tensors(self.arch, self.config).items():
            mapped.insert(0, (g, g, arr.shape))
        has_output = any(g == "output.weight" for g, _, _ in mapped)
        plan = []
        for g, src, shape in mapped:
            qtype = choose_type(g, shape, base, has_output)
            plan.append(Planned(g, src, shape, qtype, tensor_nbytes(shape, qtype)))
        seen = set()
        for p in plan:
            if p.gguf_name in seen:
                raise ModelError(f"{self.model_dir}: two tensors map to {p.gguf_name}")
            seen.add(p.gguf_name)
        return plan

    def name(self) -> str:
        name = str(self.config.get("_name_or_path") or self.model_dir.name)
        # llama.cpp gives models named phi3/phi-3 Phi-3 token attributes and requires "</s>" then
        if any(k in name.lower() for k in ("phi3", "phi-3")) and "</s>" not in self.vocab.tokens:
            name = name.lower().replace("phi-3", "phi").replace("phi3", "phi")
        return name

    def estimated_bytes(self) -> int:
        vocab = sum(len(t) + 16 for t in self.vocab.tokens) + sum(len(m) + 8 for m in self.vocab.merges)
        return sum(p.nbytes for p in self.plan) + vocab + (1 << 20)

    def data(self, p: Planned) -> np.ndarray:
        extra = archs.extra_tensors(self.arch, self.config) if p.source == p.gguf_name else {}
        w = extra[p.source] if p.source in extra else self.tensors.get(p.source)
        w = archs.transform(self.arch, self.config, p.source, w)
        return quantize(w, p.qtype)

    def write(self, path: Path, on_tensor=None) -> None:
        import gguf

        w = gguf.GGUFWriter(str(path), self.arch.gguf)
        w.add_type("model")
        w.add_name(self.name())
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(int(self.ftype))
        archs.write_hparams(w, self.arch, self.config)
        self.vocab.write(w)
        for p in self.plan:
            w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, p in enumerate(self.plan):
            w.write_tensor_data(self.data(p))
            if on_tensor:
                on_tensor(i + 1, len(self.plan), p.gguf_name)
        w.close()


def chat_for_export(vocab, run_dir: Path | None, system: str | None):
    """The chat template a run trained with (else what training would choose), written into the
    GGUF with its end-of-turn token, so llama.cpp formats and stops as the run trained."""
    from mlxft.templates import choose, recorded

    chat = recorded(run_dir) or choose(vocab.tok, system)
    vocab.chat_template = chat.template
    turn_end = [i for i in chat.stop_ids if i != vocab.eos and 0 <= i < len(vocab.tokens)]
    if turn_end:
        vocab.eot = turn_end[0]
    return chat


def quantize(w: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w, qtype)


def export_model(model_dir: Path, adapter: Path | None, out: Path, quant: str = "f16", on_tensor=None,
                 run_dir: Path | None = None, system: str | None = None) -> dict:
    """Write `out` (atomically); returns a summary for the command's output."""
    return export_job(GGUFExport(model_dir, adapter, quant, run_dir, system), out, on_tensor)


def export_job(job: GGUFExport, out: Path, on_tensor=None) -> dict:
    from mlxft.atomic import atomic_path
    from mlxft.fuse import check_disk_space

    out = Path(out)
    need = job.estimated_bytes()
    if job.quant in KQUANTS:
        from mlxft.export.quantize import require_llama_cpp

        require_llama_cpp(job.quant)
        need = need * 2  # the unquantized intermediate sits beside the result
    check_disk_space(out.parent, need, what=str(out))
    with atomic_path(out) as tmp:
        if job.quant in KQUANTS:
            inter = tmp.with_name(tmp.name + f".{job.write_as}")
            try:
                job.write(inter, on_tensor)
                kquantize(inter, tmp, job.quant)
            finally:
                if inter.exists():
                    os.unlink(inter)
        else:
            job.write(tmp, on_tensor)
    return {"output": str(out), "architecture": job.arch.gguf, "quant": job.quant,
            "tensors": len(job.plan), "bytes": out.stat().st_size, "tokenizer": job.vocab.model,
            "pre": job.vocab.pre, "adapter_merged": str(job.adapter) if job.adapter else None,
            "chat_template": {"source": job.chat.source, "family": job.chat.family, "stops": job.chat.stop_tokens}}


def export_adapter(model_dir: Path, adapter: Path, out: Path) -> dict:
    """The adapter alone as a llama.cpp LoRA GGUF (general.type = adapter): per base tensor
    `<name>.lora_a` (ne [in, r]) and `<name>.lora_b` (ne [r, out]); llama.cpp scales by
    alpha / r, so any other scaling (rsLoRA, per-module alpha) is folded into lora_b."""
    import gguf

    from mlxft.atomic import atomic_path
    from mlxft.adapters import Adapter
    from mlxft.fuse import check_disk_space, read_config

    config = read_config(model_dir)
    arch = archs.arch_for(config, str(Path(model_dir) / "config.json"))
    ad = Adapter(adapter)
    if ad.use_dora:
        raise MlxftError(f"{adapter}: DoRA adapters cannot be exported alone (llama.cpp LoRA has no magnitude "
                         "vector)", "export the fused model instead: drop --adapter-only")
    if ad.replaced:
        raise MlxftError(f"{adapter}: adapter saves whole tensors ({next(iter(ad.replaced))}); a GGUF LoRA "
                         "cannot carry them", "export the fused model instead: drop --adapter-only")
    alpha = float(ad.config.get("lora_alpha", 8))
    plan = []
    for module, parts in ad.modules.items():
        if "lora_A" not in parts:
            raise MlxftError(f"{adapter}: LoRA on {module} (an embedding) cannot be exported alone",
                             "export the fused model instead: drop --adapter-only")
        g = archs.gguf_tensor_name(arch, module + ".weight")
        if g is None:
            raise MlxftError(f"{adapter}: LoRA on {module} has no GGUF counterpart")
        plan.append((g, module))  # tensors are named "<base tensor name>.lora_a|b", .weight included
    need = sum(int(np.prod(ad.st.shape(k))) * 4 for parts in ad.modules.values() for k in parts.values()) + (1 << 20)
    check_disk_space(Path(out).parent, need, what=str(out))
    hp = archs.hparams(config)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.gguf)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", alpha)
        w.add_name(Path(adapter).name)
        tensors = []
        for base, module in sorted(plan):
            a, b = ad.factors(module)
            r = a.shape[0]
            b = b * np.float32(ad.scale(module) * r / alpha)
            if arch.permute_qk and module.endswith("self_attn.q_proj"):
                b = archs.permute_rows(b, hp["n_head"])
            elif arch.permute_qk and module.endswith("self_attn.k_proj"):
                b = archs.permute_rows(b, hp["n_head_kv"])
            tensors += [(f"{base}.lora_a", np.ascontiguousarray(a)), (f"{base}.lora_b", np.ascontiguousarray(b))]
        for name, arr in tensors:
            w.add_tensor(name, arr.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"output": str(out), "architecture": arch.gguf, "type": "lora-adapter", "alpha": alpha,
            "tensors": len(tensors), "bytes": Path(out).stat().st_size}
