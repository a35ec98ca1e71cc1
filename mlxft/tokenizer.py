"""Loading the HF tokenizer that both backends and the data pipeline share."""

from __future__ import annotations

from pathlib import Path

from mlxft.errors import ModelError


def load_tokenizer(model_path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"{model_path}: cannot load tokenizer "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
