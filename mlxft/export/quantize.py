"""K-quants (q4_k_m, q5_k_m, q6_k) through llama.cpp's own quantizer, as exposed by the
`llama-cpp-python` package (`llama_model_quantize`): mlxft writes an unquantized GGUF, then
llama.cpp picks per-tensor types exactly as its `llama-quantize` tool does."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from mlxft.errors import MlxftError

KQUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
           "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
INSTALL_HINT = ("pip install llama-cpp-python (builds llama.cpp from source, several minutes), or "
                "pip install 'mlxft[llamacpp]'; or export --quant q8_0 / q4_0 which need nothing extra")


def require_llama_cpp(quant: str):
    try:
        import llama_cpp
    except ImportError:
        raise MlxftError(f"--quant {quant}: needs llama.cpp's quantizer, which is not installed", INSTALL_HINT) from None
    if not hasattr(llama_cpp, "llama_model_quantize"):
        raise MlxftError(f"--quant {quant}: this llama-cpp-python has no llama_model_quantize", INSTALL_HINT)
    return llama_cpp


@contextlib.contextmanager
def native_log_captured():
    """llama.cpp's C code logs a line per tensor to file descriptor 2; keep it off the terminal
    and hand it back (the last lines go into the error when quantizing fails)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        lines: list[str] = []
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines.extend(log.read().decode("utf-8", "replace").splitlines())


def llama_quantize(src: Path, dst: Path, ftype_name: str, label: str, threads: int = 0) -> None:
    """Quantize the unquantized GGUF `src` into `dst` with llama.cpp (`LLAMA_FTYPE_*` name)."""
    llama_cpp = require_llama_cpp(label)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads
    with native_log_captured() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise MlxftError(f"{dst}: llama.cpp's quantizer failed (code {rc}) for {label}: "
                         f"{log[-1] if log else 'no message'}")


def kquantize(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """Quantize the unquantized GGUF `src` into `dst` with llama.cpp."""
    llama_quantize(src, dst, KQUANTS[quant], quant, threads)
