"""`mlxft export`: a model or a run (base + adapter, merged on the fly) as a GGUF file for
llama.cpp, Ollama and LM Studio; or the adapter alone as a GGUF LoRA or an mlx-lm adapter
folder; optionally a Modelfile."""

from __future__ import annotations

import click

from mlxft.commands.options import adapter_option, json_option, output_option, trust_remote_code_option

QUANT_HELP = ("f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (written by mlxft); q4_k_m, q5_k_m, q6_k "
              "(llama.cpp's quantizer, needs llama-cpp-python); auto (the smallest of q4_k_m, q5_k_m, q6_k, "
              "q8_0 within a measured KL tolerance on the run's validation text).")


@click.command()
@click.argument("model_or_run", required=False)
@output_option(required=True, help="The .gguf file to write (a folder with --adapter-format mlx-lm).")
@click.option("--quant", "-q", default=None, help=f"Tensor type [default: f16]: {QUANT_HELP}")
@click.option("--adapter-only", is_flag=True, help="Write only the run's LoRA adapter (llama.cpp --lora, Ollama ADAPTER).")
@click.option("--adapter-format", type=click.Choice(["gguf", "mlx-lm"]), default=None,
              help="Write only the run's adapter: gguf (= --adapter-only), or mlx-lm (a folder that "
                   "mlx_lm.load(model, adapter_path=DIR), mlx_lm.generate and mlx_lm.server load).")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile beside the GGUF.")
@adapter_option()
@click.option("--strict", is_flag=True, help="Exit with code 1 when the self-check finds a difference.")
@click.option("--no-check", is_flag=True, help="Skip the self-check (llama.cpp against the trained model).")
@trust_remote_code_option()
@json_option("Print the result as JSON (with every self-check figure).")
def export(model_or_run, output, quant, adapter_only, adapter_format, modelfile, adapter, strict, no_check,
           trust_remote_code, as_json):
    """Export MODEL_OR_RUN (default: the built-in SmolLM2-135M-Instruct) to a GGUF file.

    A run directory is exported as its base with the adapter merged in (float32, tensor by
    tensor, nothing fused on disk), with the chat template the run trained with. Supported:
    Llama 3.x / SmolLM2 / Mistral (llama), Qwen2, Qwen3, Gemma 3 (text), Phi-3.

    Afterwards the file checks itself: llama.cpp loads it and its tokenization, greedy answers,
    next-token distributions and stop tokens are compared with the trained model on the run's
    validation conversations (one summary line; every figure with --json). A Modelfile's
    TEMPLATE is rendered and compared with the chat template, character for character.

    \b
    Examples:
      mlxft export runs/quickstart -o tuned.gguf --quant q8_0 --modelfile
      mlxft export runs/quickstart -o tuned.gguf --quant auto --strict
      mlxft export runs/quickstart -o tuned-lora.gguf --adapter-only
      mlxft export runs/quickstart -o tuned-mlx --adapter-format mlx-lm
    """
    from pathlib import Path

    from mlxft import ui
    from mlxft.errors import MlxftError
    from mlxft.export.gguf import check_quant

    out = Path(output)
    if adapter_format == "mlx-lm":
        return _export_mlx_lm(model_or_run, out, adapter, quant, modelfile, as_json)
    adapter_only = adapter_only or adapter_format == "gguf"
    if out.is_dir():
        raise MlxftError(f"-o {output}: is a folder; give the .gguf file to write")
    if out.suffix.lower() != ".gguf":
        raise MlxftError(f"-o {output}: the output file name must end in .gguf")
    if adapter_only and quant is not None:
        raise MlxftError("--quant: not used with --adapter-only (adapter tensors are written in F32)")
    quant = "auto" if (quant or "").lower() == "auto" else check_quant(quant or "f16")
    if quant in ("q4_k_m", "q5_k_m", "q6_k", "auto"):
        from mlxft.export.quantize import require_llama_cpp

        require_llama_cpp(quant)

    from mlxft.inference import run_system_prompt
    from mlxft.sources import resolve_model

    resolved = resolve_model(model_or_run, adapter=adapter)
    if adapter_only and resolved.adapter is None:
        raise MlxftError(f"{model_or_run or 'default'}: --adapter-only needs a run directory (one with an adapter)")
    system = run_system_prompt(resolved)

    def on_tensor(i, n, name):
        status.update(f"Writing {out.name}: tensor {i}/{n} {name}")

    from mlxft.atomic import write_errors

    engine = job = None
    with write_errors("GGUF file", out), ui.console.status(f"Preparing {out.name}") as status:
        if adapter_only:
            from mlxft.export.gguf import export_adapter

            result = export_adapter(resolved.path, resolved.adapter, out)
        else:
            from mlxft.export.gguf import GGUFExport, export_job

            job = GGUFExport(resolved.path, resolved.adapter, quant, resolved.run, system)
            from mlxft.export.selfcheck import llama_cpp_installed

            if quant == "auto" or (not no_check and llama_cpp_installed()):
                engine = _trained_model(model_or_run, adapter, job.chat, status, trust_remote_code)
            if quant == "auto":
                result = _auto(job, out, engine, resolved, on_tensor, status)
            else:
                result = export_job(job, out, on_tensor=on_tensor)
    if modelfile:
        result.update(_modelfile(out, resolved, job, system, adapter_only))
    if not adapter_only and not no_check:
        result["selfcheck"] = _selfcheck(out, engine, job, resolved, result)
    _report(result, modelfile, as_json)
    failed = (result.get("selfcheck") or {}).get("ok") is False or \
        (result.get("modelfile_check") or {}).get("ok") is False
    if strict and failed:
        raise MlxftError(f"{out}: the self-check failed (--strict); the file is written, but it does not behave "
                         "like the trained model", "see the self-check line above, or run with --json")


def _trained_model(model_or_run, adapter, chat, status, trust_remote_code=False):
    """The trained model through mlxft's backend, with the template the export carries."""
    from mlxft.inference import load_for_inference
    from mlxft.templates import install

    status.update("Loading the trained model for the self-check")
    engine, _ = load_for_inference(model_or_run, "auto", adapter, trust_remote_code)
    install(engine.tokenizer, chat)
    return engine


def _validation_ids(engine, job, resolved) -> list[list[int]]:
    from mlxft.export.selfcheck import MAX_TOKENS_PER_TEXT, conversations, probe_records
    from mlxft.templates import render

    prompts = conversations(_validation_records(resolved, engine), job.chat.system_prompt)
    prompts = prompts or conversations(probe_records(), job.chat.system_prompt)
    texts = [render(engine.tokenizer, job.chat.template,
                    p.messages + ([{"role": "assistant", "content": p.answer}] if p.answer else []),
                    add_generation_prompt=not p.answer) for p in prompts[:16]]
    return [ids[:MAX_TOKENS_PER_TEXT] for ids in (engine.tokenizer(t, add_special_tokens=False)["input_ids"]
                                                   for t in texts) if len(ids) > 1]


def _auto(job, out, engine, resolved, on_tensor, status) -> dict:
    from mlxft.export.autoquant import choose_and_write

    auto = choose_and_write(job, out, engine, _validation_ids(engine, job, resolved), on_tensor, status)
    return {"output": str(out), "architecture": job.arch.gguf, "quant": auto["chosen"], "tensors": len(job.plan),
            "bytes": out.stat().st_size, "tokenizer": job.vocab.model, "pre": job.vocab.pre,
            "adapter_merged": str(job.adapter) if job.adapter else None, "auto": auto,
            "chat_template": {"source": job.chat.source, "family": job.chat.family, "stops": job.chat.stop_tokens}}


def _modelfile(out, resolved, job, system, adapter_only) -> dict:
    import json

    from mlxft.errors import MlxftError
    from mlxft.export.ollama import modelfile_system, write_modelfile

    if job is None:  # adapter only: the chat setup of the run, or of the base
        from mlxft.export.gguf import chat_for_export
        from mlxft.export.tokenizer import Vocab
        from mlxft.fuse import read_config

        config = read_config(resolved.path)
        vocab = Vocab(resolved.path, int(config["vocab_size"]), config.get("model_type", ""))
        chat, tok = chat_for_export(vocab, resolved.run, system), vocab.tok
    else:
        chat, tok = job.chat, job.vocab.tok
    base_gguf = None
    if adapter_only:
        source = resolved.path / "mlxft_source.json"
        base_gguf = json.loads(source.read_text()).get("gguf") if source.is_file() else None
        if not base_gguf:
            raise MlxftError("--modelfile: with --adapter-only the Modelfile needs the base as a GGUF file, and "
                             f"{resolved.path} was not imported from one", "export the base with mlxft export first")
    system_line = modelfile_system(chat, tok)
    info = write_modelfile(out, chat, system_line, base_gguf=base_gguf)
    from mlxft.export.selfcheck import check_modelfile

    info["modelfile_check"] = check_modelfile(info.pop("go_template"), system_line, tok, chat)
    return info


def _validation_records(resolved, engine) -> list[dict]:
    """The run's validation records, the same samples its training held out (none for a plain model)."""
    if resolved.run is None:
        return []
    from mlxft.training_data import validation_records

    return validation_records(resolved.run, engine.tokenizer)


def _selfcheck(out, engine, job, resolved, result) -> dict:
    from mlxft.export.selfcheck import llama_cpp_installed, run_selfcheck

    modelfile_check = result.get("modelfile_check")
    if not llama_cpp_installed():
        check = {"skipped": "llama.cpp is not installed (pip install llama-cpp-python)", "ok": None}
    else:
        check = run_selfcheck(out, engine, job.chat, result["quant"], _validation_records(resolved, engine))
    if modelfile_check is not None:
        check["modelfile"] = modelfile_check
        if modelfile_check.get("ok") is False:
            check["ok"] = False
    return check


def _report(result, modelfile, as_json) -> None:
    from mlxft import ui

    if as_json:
        ui.emit_json(result)
        return
    if "auto" in result:
        from mlxft.export.autoquant import table_text

        ui.result(table_text(result["auto"]))
    size = result["bytes"] / 2**20
    ui.result(f"{result['output']}  ({result.get('quant', 'lora adapter')}, {result['architecture']}, {size:.1f} MiB)")
    if modelfile:
        ui.result(f"{result['modelfile']}  (ollama create NAME -f {result['modelfile']})")
        mcheck = result.get("modelfile_check") or {}
        if mcheck.get("ok") is not True:
            ui.result(f"Modelfile template check: {mcheck.get('reason', 'failed')}")
    if "selfcheck" in result:
        from mlxft.export.selfcheck import summary_line

        ui.result(summary_line(result["selfcheck"]))


def _export_mlx_lm(model_or_run, out, adapter, quant, modelfile, as_json):
    """The run's adapter as an mlx-lm adapter folder (mlxft.mlx_lm_layout)."""
    from mlxft import ui
    from mlxft.atomic import write_errors
    from mlxft.errors import MlxftError
    from mlxft.mlx_lm_layout import write_mlx_lm_adapter
    from mlxft.sources import resolve_model

    if quant is not None or modelfile:
        raise MlxftError("--adapter-format mlx-lm: writes the adapter alone; --quant and --modelfile do not apply")
    if out.suffix.lower() == ".gguf" or out.is_file():
        raise MlxftError(f"-o {out}: --adapter-format mlx-lm writes a folder, not a file")
    resolved = resolve_model(model_or_run, adapter=adapter)
    if resolved.adapter is None:
        raise MlxftError(f"{model_or_run or 'default'}: --adapter-format needs a run directory (one with an adapter)")
    model_ref = None  # the config's `model`: a Hub id when the base came from the Hub, else its folder
    if resolved.run is not None:
        from mlxft.runs import Run

        meta = Run(resolved.run).meta()
        model_ref = meta.get("model") if meta.get("source") == "hub" else None
    with write_errors("mlx-lm adapter", out), ui.console.status(f"Writing {out}"):
        result = write_mlx_lm_adapter(resolved.adapter, out, resolved.path, model_ref)
    if as_json:
        ui.emit_json(result)
    else:
        ui.result(f"{result['output']}  (mlx-lm {result['fine_tune_type']}, rank {result['rank']}, "
                  f"scale {result['scale']:g}, last {result['num_layers']} layers; "
                  f"mlx_lm.generate --model {result['base']} --adapter-path {result['output']})")
