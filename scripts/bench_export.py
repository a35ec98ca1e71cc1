"""Benchmark: time and peak memory of `mlxft export` against llama.cpp's own
convert_hf_to_gguf.py (+ its quantizer for K-quants) on the same model and type.

    python scripts/bench_export.py [--model DIR] [--types f16,q8_0,q4_k_m] [--converter PATH]

Without --converter, the llama-cpp-python source distribution matching the installed
llama-cpp-python is downloaded with pip into a temporary folder and its converter used from
there (nothing is committed). Each tool runs in its own process; peak memory is that process's
maximum RSS (os.wait4), so the numbers include interpreter and library imports.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

QUANTIZE = ("import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
            "p.ftype = getattr(llama_cpp, 'LLAMA_FTYPE_MOSTLY_' + sys.argv[3].upper()); "
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")


def run(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command."""
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would block the child
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        log.seek(0)
        err = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def get_converter(tmp: Path) -> Path:
    import llama_cpp

    version = llama_cpp.__version__
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(tmp)], check=True, capture_output=True)
    with tarfile.open(next(tmp.glob("llama_cpp_python-*.tar.gz"))) as tar:
        tar.extractall(tmp, filter="data")
    return next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))


def llama_cpp_export(converter: Path, model: Path, out: Path, quant: str) -> tuple[float, int]:
    if quant in ("f32", "f16", "bf16", "q8_0"):
        return run([sys.executable, str(converter), str(model), "--outfile", str(out), "--outtype", quant])
    f16 = out.with_suffix(".f16.gguf")
    t1, m1 = run([sys.executable, str(converter), str(model), "--outfile", str(f16), "--outtype", "f16"])
    t2, m2 = run([sys.executable, "-c", QUANTIZE, str(f16), str(out), quant])
    f16.unlink()
    return t1 + t2, max(m1, m2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model folder (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--types", default="f16,q8_0,q4_k_m")
    ap.add_argument("--converter", help="path to llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the fastest is kept")
    args = ap.parse_args()
    if args.model:
        model = Path(args.model)
    else:
        from mlxft.sources.default import default_model_path

        model = default_model_path()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        converter = Path(args.converter) if args.converter else get_converter(tmp)
        rows = []
        for quant in args.types.split(","):
            ours, ref = tmp / f"mlxft-{quant}.gguf", tmp / f"llamacpp-{quant}.gguf"
            a = min((run([sys.executable, "-m", "mlxft", "export", str(model), "-o", str(ours), "--quant", quant])
                     for _ in range(args.repeat)), key=lambda r: r[0])
            b = min((llama_cpp_export(converter, model, ref, quant) for _ in range(args.repeat)), key=lambda r: r[0])
            rows.append((quant, a, b, ours.stat().st_size, ref.stat().st_size))
            ours.unlink()
            ref.unlink()
    mib = 2**20
    print(f"model: {model}")
    print(f"{'type':8} {'mlxft s':>8} {'llama.cpp s':>11} {'time ratio':>10} {'mlxft peak MiB':>14} "
          f"{'llama.cpp peak MiB':>18} {'mem ratio':>9} {'mlxft MiB':>9} {'llama.cpp MiB':>13}")
    for quant, (ta, ma), (tb, mb), sa, sb in rows:
        print(f"{quant:8} {ta:8.1f} {tb:11.1f} {ta / tb:10.2f} {ma / mib:14.0f} {mb / mib:18.0f} {ma / mb:9.2f} "
              f"{sa / mib:9.1f} {sb / mib:13.1f}")


if __name__ == "__main__":
    main()
