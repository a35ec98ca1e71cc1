"""Pulling from the Hub with the real huggingface_hub client against a loopback fake Hub
(tests/hub_server.py): pull, progress, pinned revision, errors, cut connections and the next pull,
offline use afterwards, and the `mlxft pull` / `mlxft models` commands."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from mlxft.errors import ModelError
from tests.hub_server import FakeHub
from tests.helpers.hub import tiny_llama_files

REPO = "tiny-org/tiny-llama"


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub on loopback, with HF_ENDPOINT pointed at it and offline mode off."""
    import huggingface_hub.constants as hf_constants

    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; mlxft reads the env var at call time
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    yield server
    server.close()


def go_offline(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def cache_root() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub"


def test_pull_fetches_only_what_a_finetune_needs(hub):
    from mlxft.sources.hub import pull_model

    files = tiny_llama_files()
    hub.add_repo(REPO, files)
    result = pull_model(REPO)
    snap = result.path
    assert snap == cache_root() / "models--tiny-org--tiny-llama" / "snapshots" / result.commit
    assert sorted(p.name for p in snap.iterdir()) == sorted(
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (snap / name).read_bytes() == files[name]
        assert (snap / name).is_symlink()  # HF cache layout: snapshot entries point into blobs/
    assert (cache_root() / "models--tiny-org--tiny-llama" / "refs" / "main").read_text() == result.commit
    fetched = {r[1] for r in hub.requests("GET")}
    assert not any("pytorch_model.bin" in p or "onnx" in p or "README" in p for p in fetched)
    # the big file came through the CDN redirect, like LFS files on the Hub
    assert hub.requests("GET", "/blobs/")
    # pulling again fetches no file, not even its metadata: only the repo's listing is asked for
    files_asked = lambda: [r for r in hub.log if "/resolve/" in r[1] or "/blobs/" in r[1]]  # noqa: E731
    n_files = len(files_asked())
    again = pull_model(REPO)
    assert again.cached and again.commit == result.commit and again.downloaded == 0
    assert len(files_asked()) == n_files
    assert {p.split("?")[0] for _, p, _ in hub.log[-2:]} <= {f"/api/models/{REPO}", f"/api/models/{REPO}/revision/main"}


def test_pull_progress_is_one_rich_display(hub, monkeypatch, capfd):
    """On a terminal, huggingface_hub's progress reaches mlxft's console as rich bars (the pull's
    bytes, and a lone file fetched before it); the library's own tqdm bars print nothing."""
    from rich.console import Console

    import mlxft.ui
    from mlxft.sources.hub import pull_model

    files = tiny_llama_files(big=True)
    hub.add_repo(REPO, files)
    monkeypatch.delenv("MLXFT_NO_PROGRESS")
    screen = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=150)
    monkeypatch.setattr(mlxft.ui, "console", screen)
    result = pull_model(REPO)
    shown = screen.file.getvalue()
    # the last frame of the pull's bar: every byte of the files fetched after config.json
    last = re.findall(rf"{REPO} @ {result.commit[:7]} .*? ([0-9.]+)/([0-9.]+) kB", shown)[-1]
    rest = sum(len(files[n]) for n in result.files if n != "config.json")
    assert last == (f"{rest / 1000:.1f}",) * 2
    n = len(files["config.json"])
    assert re.search(rf"  config\.json .* {n}/{n} bytes", shown)
    assert capfd.readouterr().err == ""


def test_pinned_revision_and_standard_cache_readers(hub):
    from huggingface_hub import hf_hub_download

    from mlxft.sources import resolve_model
    from mlxft.sources.hub import pull_model

    repo = hub.add_repo(REPO, tiny_llama_files(seed=1))
    old = repo.refs["main"]
    repo.add_commit(tiny_llama_files(seed=2))
    new = repo.refs["main"]
    assert old != new
    pinned = pull_model(REPO, old)
    assert pinned.commit == old and pinned.path.name == old
    assert (pinned.path / "model.safetensors").read_bytes() == tiny_llama_files(seed=1)["model.safetensors"]
    # a model argument with @REV resolves to that commit and reports it (run.json records it)
    resolved = resolve_model(f"{REPO}@{old[:40]}")
    assert resolved.revision == old and resolved.source == "hub" and resolved.path == pinned.path
    latest = resolve_model(REPO)
    assert latest.revision == new
    # the cache is the standard one: huggingface_hub finds the files without the network
    path = hf_hub_download(REPO, "config.json", revision=old, cache_dir=str(cache_root()), local_files_only=True)
    assert Path(path).read_bytes() == tiny_llama_files(seed=1)["config.json"]


def test_unknown_repo_and_revision_are_one_line_errors(hub):
    from mlxft.sources.hub import pull_model

    with pytest.raises(ModelError, match=r"nobody/nothing: no such model on the Hub \(404\)"):
        pull_model("nobody/nothing")
    hub.add_repo(REPO, tiny_llama_files())
    with pytest.raises(ModelError, match="revision 'v9' not found"):
        pull_model(REPO, "v9")
    result = CliRunner().invoke(cli, ["pull", "nobody/nothing"])
    assert result.exit_code == 1
    assert "nobody/nothing: no such model on the Hub" in result.output
    assert not (cache_root() / "models--nobody--nothing").exists()


def test_gated_repo_needs_a_token(hub, monkeypatch):
    from mlxft.sources.hub import pull_model

    hub.add_repo(REPO, tiny_llama_files(), gated=True, allowed_tokens={"hf_good"})
    with pytest.raises(ModelError, match="gated repo, and no token is set"):
        pull_model(REPO)
    assert not (cache_root() / "models--tiny-org--tiny-llama").exists()
    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    with pytest.raises(ModelError, match="gated repo, and HF_TOKEN has no access"):
        pull_model(REPO)
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    result = pull_model(REPO)
    assert (result.path / "model.safetensors").is_file()
    assert any(h.get("authorization") == "Bearer hf_good" for _, p, h in hub.requests("HEAD", "/resolve/"))
    # the token is not sent to the CDN host
    assert all("authorization" not in h for _, _, h in hub.requests("GET", "/blobs/"))


@pytest.mark.parametrize("case,match", [
    ("pickle", "has only pickle weights"),
    ("encoder", "is not a causal language model"),
    ("truncated", "model.safetensors is truncated or corrupt"),
    ("no_config", "not a transformers model repo"),
])
def test_bad_repos_leave_nothing_behind(hub, case, match):
    from mlxft.sources.hub import pull_model

    files = tiny_llama_files()
    if case == "pickle":
        del files["model.safetensors"]
    elif case == "encoder":
        files["config.json"] = json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}).encode()
    elif case == "truncated":
        files["model.safetensors"] = files["model.safetensors"][:-100]
    elif case == "no_config":
        del files["config.json"]
    hub.add_repo(REPO, files)
    with pytest.raises(ModelError, match=match) as err:
        pull_model(REPO)
    assert "\n" not in str(err.value.message)
    assert not (cache_root() / "models--tiny-org--tiny-llama").exists()


def test_bad_new_revision_is_removed_and_the_old_one_stays(hub):
    from mlxft.sources.hub import pull_model

    repo = hub.add_repo(REPO, tiny_llama_files(seed=1))
    good = pull_model(REPO)
    bad = tiny_llama_files(seed=2)
    bad["model.safetensors"] = bad["model.safetensors"][:-100]
    repo.add_commit(bad)
    with pytest.raises(ModelError, match="model.safetensors is truncated or corrupt"):
        pull_model(REPO)
    snapshots = cache_root() / "models--tiny-org--tiny-llama" / "snapshots"
    assert [p.name for p in snapshots.iterdir()] == [good.commit]
    assert (good.path / "model.safetensors").read_bytes() == tiny_llama_files(seed=1)["model.safetensors"]
    assert pull_model(REPO, good.commit).cached


@pytest.fixture
def small_chunks(monkeypatch):
    """huggingface_hub writes downloads in 10 MB chunks (bytes of an unfinished chunk are lost
    when a connection drops); 4 KB chunks let a small test file show a partial download."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)


def test_cut_connection_then_next_pull_fetches_what_is_missing(hub, small_chunks):
    """The CDN drops the connection mid-file and stays down: the pull fails with a one-line error
    and leaves no partial file anywhere; the files it finished stay, and the next pull fetches only
    the unfinished one, from its first byte (huggingface_hub does not resume a file across calls)."""
    from mlxft.sources.hub import pull_model

    files = tiny_llama_files(big=True)
    weights = files["model.safetensors"]
    hub.add_repo(REPO, files)
    hub.cut["model.safetensors"] = len(weights) // 3
    hub.fail_after_cut = True
    with pytest.raises(ModelError, match="download interrupted.*run `mlxft pull tiny-org/tiny-llama` again"):
        pull_model(REPO)
    storage = cache_root() / "models--tiny-org--tiny-llama"
    assert not [p for p in storage.rglob("*") if "incomplete" in p.name]
    assert not any((storage / "snapshots").rglob("model.safetensors"))  # nothing half-written in the snapshot
    kept = {p.name for p in (storage / "snapshots").rglob("*") if p.is_file()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= kept
    hub.failing = False
    mark = len(hub.log)
    result = pull_model(REPO)
    asked = [(m, p, h) for m, p, h in hub.log[mark:] if "/resolve/" in p or "/blobs/" in p]
    assert {p.split("/resolve/")[1].split("/", 1)[1] for _, p, _ in asked if "/resolve/" in p} == {"model.safetensors"}
    assert [h.get("range") for m, p, h in asked if m == "GET" and "/blobs/" in p] == [None]
    assert (result.path / "model.safetensors").read_bytes() == weights
    assert result.downloaded == len(weights)


def test_cut_connection_resumes_within_one_pull(hub, small_chunks):
    """A single dropped connection is retried at once from where it stopped (Range request)."""
    from mlxft.sources.hub import pull_model

    files = tiny_llama_files(big=True)
    hub.add_repo(REPO, files)
    hub.cut["model.safetensors"] = 3 * 4096
    result = pull_model(REPO)
    assert (result.path / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert [h.get("range") for _, _, h in hub.requests("GET", "/blobs/")] == [None, f"bytes={3 * 4096}-"]


def test_offline_after_pull(hub, monkeypatch):
    from mlxft.sources import resolve_model
    from mlxft.sources.hub import pull_model

    hub.add_repo(REPO, tiny_llama_files())
    pulled = pull_model(REPO)
    hub.close()  # no network at all from here on
    go_offline(monkeypatch)
    resolved = resolve_model(REPO)
    assert resolved.path == pulled.path and resolved.revision == pulled.commit
    runner = CliRunner()
    listing = runner.invoke(cli, ["models", "--json"])
    assert listing.exit_code == 0, listing.output
    rows = [r for r in json.loads(listing.stdout) if r["repo"] == REPO]
    assert rows and rows[0]["revision"] == pulled.commit and rows[0]["complete"]
    assert rows[0]["architecture"] == "LlamaForCausalLM" and rows[0]["backends"]["torch"]
    again = runner.invoke(cli, ["pull", REPO])
    assert again.exit_code == 0 and again.stdout.strip() == str(pulled.path)
    missing = runner.invoke(cli, ["pull", "other/model"])
    assert missing.exit_code == 1
    assert "HF_HUB_OFFLINE=1" in missing.output and len(missing.output.strip().splitlines()) == 1
    with pytest.raises(ModelError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        resolve_model("other/model")


def test_no_network_is_one_line(hub):
    from mlxft.sources.hub import pull_model

    hub.close()
    with pytest.raises(ModelError, match="tiny-org/tiny-llama: cannot reach the Hub at http://127.0.0.1"):
        pull_model(REPO)


def test_pull_and_models_commands(hub):
    hub.add_repo(REPO, tiny_llama_files())
    runner = CliRunner()
    pulled = runner.invoke(cli, ["pull", REPO, "--json"])
    assert pulled.exit_code == 0, pulled.output
    info = json.loads(pulled.stdout)
    assert Path(info["path"]).is_dir() and len(info["revision"]) == 40
    table = runner.invoke(cli, ["models"])
    assert table.exit_code == 0 and REPO in table.stdout and info["revision"][:12] in table.stdout
    removed = runner.invoke(cli, ["models", "rm", REPO, "--yes"])
    assert removed.exit_code == 0, removed.output
    assert not (cache_root() / "models--tiny-org--tiny-llama").exists()
    assert json.loads(runner.invoke(cli, ["models", "--json"]).stdout) == [] or all(
        r["repo"] != REPO for r in json.loads(runner.invoke(cli, ["models", "--json"]).stdout))
