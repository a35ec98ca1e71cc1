"""`mlxft pull REPO`: download a model from the Hugging Face Hub into the standard HF cache."""

from __future__ import annotations

import click

from mlxft.commands.options import json_option


@click.command()
@click.argument("repo")
@click.option("--revision", metavar="REV", help="Branch, tag or commit to pin (default: main). "
              "Also accepted as REPO@REV.")
@click.option("--force", is_flag=True, help="Download every file again, even if cached.")
@json_option()
def pull(repo, revision, force, as_json):
    """Download REPO (ORG/NAME) from the Hugging Face Hub for fine-tuning.

    Only what a fine-tune needs is fetched: safetensors weights and index, config, tokenizer
    files, chat template and generation config; pickle weights (.bin, .pt) never. Files go to the
    standard HF cache (HF_HOME / HF_HUB_CACHE), so other tools see them too. HF_TOKEN is used for
    gated and private repos; HF_ENDPOINT picks a mirror. Run again after an interrupted pull, it
    fetches only the files not yet finished. The local snapshot path is printed on stdout.

    \b
    Examples:
      mlxft pull HuggingFaceTB/SmolLM2-135M-Instruct
      mlxft pull Qwen/Qwen3-0.6B --revision 1a2b3c4
    """
    from mlxft import ui
    from mlxft.errors import MlxftError
    from mlxft.sources.hub import parse_spec, pull_model

    repo_id, at_revision = parse_spec(repo)
    if at_revision and revision and at_revision != revision:
        raise MlxftError(f"'{repo}': two revisions given ({at_revision} and --revision {revision})")
    result = pull_model(repo_id, revision or at_revision, force=force)
    if result.cached:
        ui.info(f"{repo_id} @ {result.commit[:12]} is already in the cache")
    if as_json:
        ui.emit_json({"repo": result.repo, "revision": result.commit, "path": str(result.path),
                      "files": result.files, "downloaded_bytes": result.downloaded, "cached": result.cached})
    else:
        ui.result(str(result.path))
