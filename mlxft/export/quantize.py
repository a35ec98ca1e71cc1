"""K-quants (q4_k_m, q5_k_m, q6_k) through llama.cpp's own quantizer, as exposed by the
`llama-cpp-python` package (`llama_model_quantize`): mlxft writes an unquantized GGUF, then
llama.cpp picks per-tensor types exactly as its `llama-quantize` tool does."""

from __future__ import annotations

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


def kquantize(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """Quantize the unquantized GGUF `src` into `dst` with llama.cpp."""
    llama_cpp = require_llama_cpp(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANTS[quant])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise MlxftError(f"{dst}: llama.cpp's quantizer failed (code {rc}) for {quant}")
