"""Import a GGUF file (the kind Ollama and LM Studio keep) as an HF-format model folder.

Supported architectures: llama, qwen2, qwen3, gemma3 (and mistral, which llama.cpp writes as
llama). The file is checked first with gguf-py's GGUFReader (header, architecture, every tensor's
data inside the file), then transformers' GGUF support dequantizes the weights to float32 (every
type gguf-py knows, K-quants included), undoes llama.cpp's q/k row permutation, and builds the
tokenizer from the GGUF vocabulary (BPE with merges, or SentencePiece with scores) and carries
the chat template over. For BPE vocabularies the pre-tokenizer is then set to the exact split
regexes llama.cpp uses for the file's `tokenizer.ggml.pre` (transformers lacks some, e.g.
`smollm`, whose digits llama.cpp splits one by one), so the folder tokenizes as the GGUF does.
config.json also carries the RoPE fields mlx-lm reads (mlxft/mlx_lm_config.py).

Imports are cached under MLXFT_HOME/models/<name>-<sha256[:12]>, keyed by the file's hash, so
each GGUF is converted once; `mlxft_source.json` there records where it came from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlxft.atomic import atomic_dir
from mlxft.errors import ModelError
from mlxft.paths import imported_models_dir

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "mistral")
IMPORT_FORMAT = 3  # bump when the conversion changes; older imports are redone once

# llama.cpp's BPE pre-tokenizer regexes (src/llama-vocab.cpp), applied one after another, for the
# `tokenizer.ggml.pre` values transformers has no table entry for.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMACPP_BPE_SPLITS: dict[str, list[str]] = {
    **{pre: [r"\p{N}", _GPT2] for pre in
       ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b")},
    **{pre: [_GPT2] for pre in ("gpt-2", "phi-2", "jina-es", "jina-de", "mpt", "olmo", "jais", "trillion")},
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
}


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file, cached beside the import by (size, mtime) so re-resolving is instant."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index = imported_models_dir() / "digests.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    known[key] = digest
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_suffix(f".tmp-{id(known)}")
    tmp.write_text(json.dumps(known))
    tmp.replace(index)
    return digest


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception:
        return default


def inspect_gguf(path: Path) -> dict:
    """Architecture, tokenizer kind and sizes of a GGUF, after checking the file is whole.
    Raises a one-line ModelError for a truncated or corrupt file."""
    from gguf import GGUFReader

    path = Path(path)
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (bad magic)")
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError/IndexError/etc. on damaged files
        raise ModelError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelError(f"{path}: GGUF has no general.architecture")
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelError(f"{path}: truncated or corrupt GGUF file (tensor {t.name} runs past the "
                             f"end of the {size}-byte file)")
    if not reader.tensors:
        raise ModelError(f"{path}: GGUF has no tensors (a vocabulary-only file?)")
    return {"architecture": arch, "tokenizer": _field(reader, "tokenizer.ggml.model"),
            "pre": _field(reader, "tokenizer.ggml.pre"), "file_type": _field(reader, "general.file_type"),
            "types": sorted({t.tensor_type.name for t in reader.tensors}),
            "chat_template": _field(reader, "tokenizer.chat_template")}


def read_architecture(path: Path) -> str:
    return inspect_gguf(path)["architecture"]


def import_gguf(path: Path, name: str | None = None) -> Path:
    """Return an HF-format folder for `path`, converting it on first use."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file not found")
    digest = file_digest(path)
    target = imported_models_dir() / f"{name or path.stem}-{digest[:12]}"
    if (target / "config.json").is_file() and _import_format(target) >= IMPORT_FORMAT:
        return target
    # The same bytes under another name (an Ollama tag alias, a copied file): reuse that import.
    for other in sorted(imported_models_dir().glob(f"*-{digest[:12]}")):
        if (other / "config.json").is_file() and _import_format(other) >= IMPORT_FORMAT:
            return other
    info = inspect_gguf(path)
    if info["architecture"] not in SUPPORTED_ARCHS:
        raise ModelError(f"{path}: GGUF architecture '{info['architecture']}' is not supported",
                         f"supported: {', '.join(SUPPORTED_ARCHS)}")
    from mlxft.ui import console

    with console.status(f"Importing {path.name} (once; cached in {target.parent})"):
        _convert_with_transformers(path, target, digest, info)
    return target


def _import_format(target: Path) -> int:
    try:
        return int(json.loads((target / "mlxft_source.json").read_text()).get("format", 1))
    except (OSError, ValueError, TypeError):
        return 1


def llamacpp_pre_tokenizer(pre: str | None):
    """The tokenizers pre-tokenizer that splits text as llama.cpp does for `pre`, or None when
    mlxft has no table entry (transformers' own choice is kept then)."""
    from tokenizers import Regex, pre_tokenizers

    splits = LLAMACPP_BPE_SPLITS.get(pre or "")
    if splits is None:
        return None
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _convert_with_transformers(path: Path, target: Path, digest: str, info: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlxft.mlx_lm_config import write_shared_config
    from mlxft.ui import progress_frames_dropped, quiet_libraries

    quiet_libraries()
    kwargs = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; ask for a plain dense float32 model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        with progress_frames_dropped():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32, **kwargs)
    except Exception as exc:
        raise ModelError(f"{path}: cannot import GGUF ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if info.get("tokenizer") == "gpt2":
        pre = llamacpp_pre_tokenizer(info.get("pre"))
        if pre is not None:
            tokenizer.backend_tokenizer.pre_tokenizer = pre
    if info.get("chat_template") and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = info["chat_template"]
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = path.stem
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_shared_config(tmp)  # RoPE fields mlx-lm reads, beside transformers' rope_parameters
        tokenizer.save_pretrained(tmp)
        (tmp / "mlxft_source.json").write_text(json.dumps(
            {"kind": "gguf", "gguf": str(path.resolve()), "sha256": digest, "format": IMPORT_FORMAT,
             "architecture": info["architecture"], "tokenizer": info.get("tokenizer"),
             "pre": info.get("pre"), "tensor_types": info.get("types")}, indent=2))
