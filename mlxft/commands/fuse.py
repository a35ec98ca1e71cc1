"""`mlxft fuse`: merge a run's adapter into its base and save an HF-format model folder."""

from __future__ import annotations

import click

from mlxft.commands.options import adapter_option, json_option, output_option


@click.command()
@click.argument("model_or_run")
@output_option(required=True, type=click.Path(file_okay=False), help="The folder to write.")
@click.option("--quant", "-q", "--quantize", "quantize_bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Re-quantize the fused weights (MLX affine format, group 64), for mlx-lm.")
@adapter_option("Which adapter of the run to merge: the best by validation, or the last saved.")
@json_option()
def fuse(model_or_run, output, quantize_bits, adapter, as_json):
    """Merge the adapter of run MODEL_OR_RUN into its base model and write an HF-format folder
    (safetensors, config, tokenizer, chat template) that transformers and mlx-lm load.

    The merge is done in float32 and cast once to the base's dtype. A quantized base is
    dequantized first (merging into quantized weights can erase a small adapter); pass
    --quant BITS (also spelled --quantize) to quantize the fused result again.
    """
    from pathlib import Path

    from mlxft import ui
    from mlxft.errors import MlxftError
    from mlxft.fuse import fuse_model
    from mlxft.sources import resolve_model

    resolved = resolve_model(model_or_run, adapter=adapter)
    if resolved.adapter is None:
        raise MlxftError(f"{model_or_run}: not a run directory with an adapter; nothing to fuse")
    out = Path(output)
    if out.resolve() in (resolved.path.resolve(), resolved.adapter.resolve()):
        raise MlxftError(f"-o {output}: would overwrite the model being read")
    from mlxft.atomic import write_errors

    with write_errors("fused model", out), ui.console.status(f"Fusing {resolved.adapter} into {resolved.path.name}"):
        result = fuse_model(resolved.path, resolved.adapter, out,
                            quantize_bits=int(quantize_bits) if quantize_bits else None)
    if as_json:
        ui.emit_json(result)
    else:
        ui.result(f"{result['output']}  ({result['tensors_merged']} tensors merged, {result['dtype']}"
                  + (f", {quantize_bits}-bit" if quantize_bits else "") + ")")
