"""`mlxft export`: a model or a run (base + adapter, merged on the fly) as a GGUF file for
llama.cpp, Ollama and LM Studio; or the adapter alone as a GGUF LoRA; optionally a Modelfile."""

from __future__ import annotations

import click

QUANT_HELP = ("f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (written by mlxft); q4_k_m, q5_k_m, q6_k "
              "(llama.cpp's quantizer, needs llama-cpp-python).")


@click.command()
@click.argument("model_or_run", required=False)
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="The .gguf file to write.")
@click.option("--quant", "-q", default=None, help=f"Tensor type [default: f16]: {QUANT_HELP}")
@click.option("--adapter-only", is_flag=True, help="Write only the run's LoRA adapter (llama.cpp --lora, Ollama ADAPTER).")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile beside the GGUF.")
@click.option("--adapter", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Which adapter of a run to use.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(model_or_run, output, quant, adapter_only, modelfile, adapter, as_json):
    """Export MODEL_OR_RUN (default: the built-in SmolLM2-135M-Instruct) to a GGUF file.

    A run directory is exported as its base with the adapter merged in (float32, tensor by
    tensor, nothing fused on disk). Supported: Llama 3.x / SmolLM2 / Mistral (llama), Qwen2,
    Qwen3, Gemma 3 (text), Phi-3.

    \b
    Examples:
      mlxft export runs/quickstart -o tuned.gguf --quant q8_0 --modelfile
      mlxft export runs/quickstart -o tuned-lora.gguf --adapter-only
    """
    from pathlib import Path

    from mlxft import ui
    from mlxft.errors import MlxftError
    from mlxft.export.gguf import check_quant

    out = Path(output)
    if out.suffix.lower() != ".gguf":
        raise MlxftError(f"-o {output}: the output file name must end in .gguf")
    if adapter_only and quant is not None:
        raise MlxftError("--quant: not used with --adapter-only (adapter tensors are written in F32)")
    quant = check_quant(quant or "f16")
    if quant in ("q4_k_m", "q5_k_m", "q6_k"):
        from mlxft.export.quantize import require_llama_cpp

        require_llama_cpp(quant)

    from mlxft.inference import run_system_prompt
    from mlxft.sources import resolve_model

    resolved = resolve_model(model_or_run, adapter=adapter)
    if adapter_only and resolved.adapter is None:
        raise MlxftError(f"{model_or_run or 'default'}: --adapter-only needs a run directory (one with an adapter)")

    def on_tensor(i, n, name):
        status.update(f"Writing {out.name}: tensor {i}/{n} {name}")

    from mlxft.atomic import write_errors

    with write_errors("GGUF file", out), ui.console.status(f"Preparing {out.name}") as status:
        if adapter_only:
            from mlxft.export.gguf import export_adapter

            result = export_adapter(resolved.path, resolved.adapter, out)
        else:
            from mlxft.export.gguf import export_model

            result = export_model(resolved.path, resolved.adapter, out, quant, on_tensor=on_tensor)
    if modelfile:
        import json

        from mlxft.export.ollama import write_modelfile
        from mlxft.export.tokenizer import Vocab
        from mlxft.fuse import read_config

        config = read_config(resolved.path)
        vocab = Vocab(resolved.path, int(config["vocab_size"]), config.get("model_type", ""))
        base_gguf = None
        if adapter_only:
            source = resolved.path / "mlxft_source.json"
            base_gguf = json.loads(source.read_text()).get("gguf") if source.is_file() else None
            if not base_gguf:
                raise MlxftError("--modelfile: with --adapter-only the Modelfile needs the base as a GGUF file, and "
                                 f"{resolved.path} was not imported from one", "export the base with mlxft export first")
        result.update(write_modelfile(out, vocab, run_system_prompt(resolved), base_gguf=base_gguf))
        if result["template"] is None:
            ui.warn("chat template not recognised; the Modelfile has no TEMPLATE")
    if as_json:
        ui.emit_json(result)
    else:
        size = result["bytes"] / 2**20
        ui.result(f"{result['output']}  ({result.get('quant', 'lora adapter')}, {result['architecture']}, {size:.1f} MiB)")
        if modelfile:
            ui.result(f"{result['modelfile']}  (ollama create NAME -f {result['modelfile']})")
