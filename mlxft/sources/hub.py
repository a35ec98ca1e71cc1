"""Models from the Hugging Face Hub, kept in the standard HF cache (HF_HOME / HF_HUB_CACHE).

`pull_model` fetches only what a fine-tune needs: safetensors weights and their index, config,
tokenizer files, chat template, generation config. Pickle weights (.bin, .pt) are never fetched.
huggingface_hub does the Hub's side: `model_info` lists the repo, `hf_hub_download` fetches the
config (checked before any weight is fetched) and the shard index, `snapshot_download` with
`allow_patterns` fetches the chosen files into the cache layout and writes the ref, and
`try_to_load_from_cache` finds a cached copy without the network. mlxft adds what the library
lacks: which files to fetch, whether the model can be trained, and one-line errors.

Resuming, as huggingface_hub 1.31 to 2.x does it (the range pyproject.toml pins): a connection
that drops mid-file is retried at once with a Range request from where it stopped; a pull that
fails anyway keeps every finished file, and the next pull fetches only the others, but a file left
unfinished starts over (the library downloads into a temporary file it deletes on failure).

Environment honoured at call time: HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlxft.errors import ModelError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Files a fine-tune needs besides the weights (top level of the repo only).
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"


# --- environment (read at call time: huggingface_hub reads it once, at import) -------------------

def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def is_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'org/name' or 'org/name@revision' -> (repo_id, revision or None)."""
    repo, _, revision = spec.partition("@")
    repo = repo.strip().strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelError(f"'{spec}': not a Hub repo id (expected ORG/NAME or ORG/NAME@REVISION)")
    return repo, (revision or None)


def repo_folder(repo: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache_dir()) / ("models--" + repo.replace("/", "--"))


# --- the cache ---------------------------------------------------------------------------------

def snapshot_problem(path: Path) -> str | None:
    """Why a snapshot folder cannot be trained from, or None when it has config, tokenizer and
    every weight file (files appear in a snapshot only once complete)."""
    if not (path / "config.json").is_file():
        return "no config.json"
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return "no tokenizer files"
    index = path / INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return f"unreadable {INDEX}"
        missing = sorted(s for s in shards if not (path / s).is_file())
        return f"missing {', '.join(missing)}" if missing else None
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        return "no safetensors weights"
    return None


def cached_snapshot(repo: str, revision: str | None = None) -> tuple[Path, str] | None:
    """(snapshot folder, commit) for a complete cached copy of `repo` at `revision`, else None.
    huggingface_hub resolves the revision (a commit, or a branch or tag through refs/)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", cache_dir=hub_cache_dir(), revision=revision)
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    if snapshot_problem(snapshot) is None:
        return snapshot, snapshot.name
    return None


def resolve_hub_model(spec: str, allow_download: bool = True) -> tuple[Path, str]:
    """A model argument that names a Hub repo -> (local snapshot folder, commit hash).

    A complete cached copy is used as is (no network); otherwise the repo is pulled, unless
    offline (HF_HUB_OFFLINE=1) or `allow_download` is False, which is a one-line error."""
    repo, revision = parse_spec(spec)
    found = cached_snapshot(repo, revision)
    if found:
        return found
    if is_offline() or not allow_download:
        why = "HF_HUB_OFFLINE=1" if is_offline() else "downloads are off for this command"
        raise ModelError(f"'{spec}' is not in the Hugging Face cache ({hub_cache_dir()}) and {why}",
                         f"run `mlxft pull {spec.replace('@', ' --revision ', 1)}` with network access")
    result = pull_model(repo, revision)
    return result.path, result.commit


# --- pulling -----------------------------------------------------------------------------------

@dataclass
class PullResult:
    repo: str
    commit: str
    path: Path
    files: list[str] = field(default_factory=list)
    downloaded: int = 0   # bytes of the files this pull had to fetch
    cached: bool = False  # nothing had to be fetched


def _network_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                       ("requests", ("ConnectionError", "Timeout"))):
        try:
            module = __import__(mod)
        except ImportError:
            continue
        errs += [getattr(module, n) for n in names if hasattr(module, n)]
    return tuple(errs)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def select_files(repo: str, names: list[str], read_index) -> list[str]:
    """The files of `names` (repo paths) a fine-tune needs; `read_index()` returns the parsed
    safetensors index when the repo has one. Raises ModelError for repos mlxft cannot use."""
    top = [n for n in names if "/" not in n]
    if "config.json" not in top:
        gguf = [n for n in names if n.endswith(".gguf")]
        if gguf:
            raise ModelError(f"{repo}: holds GGUF files only ({gguf[0]}, ...), not an HF-format model",
                             "download the .gguf you want and pass its path as the model")
        raise ModelError(f"{repo}: not a transformers model repo (no config.json)")
    if INDEX in top:
        try:
            shards = sorted(set(read_index()["weight_map"].values()))
        except (KeyError, TypeError, AttributeError, ValueError):
            raise ModelError(f"{repo}: {INDEX} is unreadable") from None
        missing = [s for s in shards if s not in names]
        if missing:
            raise ModelError(f"{repo}: {INDEX} names {missing[0]}, which the repo does not have")
        weights = [INDEX, *shards]
    elif "model.safetensors" in top:
        weights = ["model.safetensors"]
    else:
        weights = [n for n in top if n.endswith(".safetensors")]
    if not weights:
        pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelError(f"{repo}: has only pickle weights ({', '.join(pickles[:2])}); mlxft loads "
                             "safetensors only, since pickle files can run code when loaded",
                             "convert it to safetensors or pick a repo that has them")
        raise ModelError(f"{repo}: has no safetensors weights")
    side = [n for n in SIDE_FILES if n in top]
    if not any(n in top for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelError(f"{repo}: has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    # config first (checked before the weights are fetched), then small files, then weights
    return ["config.json"] + [n for n in side if n != "config.json"] + [w for w in weights if w not in side]


def check_trainable(config: dict, where: str) -> None:
    """Raise ModelError unless `config` describes a causal LM some backend can load."""
    from mlxft.sources.capabilities import is_causal_lm, backend_support

    if not is_causal_lm(config):
        arch = ", ".join(config.get("architectures") or []) or config.get("model_type") or "unknown"
        raise ModelError(f"{where}: is not a causal language model ({arch}); mlxft fine-tunes "
                         "decoder-only text generators")
    support = backend_support(config)
    if not any(support.values()):
        raise ModelError(f"{where}: architecture '{config.get('model_type')}' is not supported by "
                         "the installed transformers or mlx-lm")


def pull_model(repo: str, revision: str | None = None, *, force: bool = False) -> PullResult:
    """Download what a fine-tune needs from `repo` at `revision` (branch, tag or commit) into the
    HF cache and return where it is. A repo refused as bad input leaves nothing behind; an
    interrupted pull keeps the files it finished."""
    from huggingface_hub import errors

    if is_offline():
        found = cached_snapshot(repo, revision)
        if found:
            return PullResult(repo, found[1], found[0], cached=True)
        raise ModelError(f"{repo}: cannot pull while HF_HUB_OFFLINE=1 and it is not in the cache "
                         f"({hub_cache_dir()})", "unset HF_HUB_OFFLINE to download it")
    storage = repo_folder(repo)
    before = _snapshots(storage) if storage.is_dir() else None
    try:
        return _pull(repo, revision, force)
    except errors.GatedRepoError:
        _undo(storage, before)
        raise ModelError(f"{repo}: gated repo, and {'HF_TOKEN has no access' if os.environ.get('HF_TOKEN') else 'no token is set'}",
                         "accept its terms on the Hub, then set HF_TOKEN or run `hf auth login`") from None
    except errors.RevisionNotFoundError:
        _undo(storage, before)
        raise ModelError(f"{repo}: revision '{revision}' not found on the Hub") from None
    except errors.RepositoryNotFoundError:
        _undo(storage, before)
        raise ModelError(f"{repo}: no such model on the Hub (404)",
                         "check the name; for a private repo set HF_TOKEN") from None
    except errors.RemoteEntryNotFoundError as exc:
        _undo(storage, before)
        raise ModelError(f"{repo}: a listed file is missing on the Hub ({_describe(exc)})") from None
    except ModelError:
        _undo(storage, before)
        raise
    except errors.OfflineModeIsEnabled:
        raise ModelError(f"{repo}: cannot pull: huggingface_hub is in offline mode (HF_HUB_OFFLINE)") from None
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, *_network_errors(), OSError) as exc:
        # LocalEntryNotFoundError: the library could not reach the Hub for a file it has no copy of;
        # OSError "Consistency check failed": a file ended short
        if isinstance(exc, (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, *_network_errors())) \
                or "Consistency check" in str(exc):
            raise ModelError(f"{repo}: download interrupted ({_describe(exc)}) from {hub_endpoint()}",
                             f"run `mlxft pull {repo}` again to fetch the files still missing") from None
        raise


def _pull(repo: str, revision: str | None, force: bool) -> PullResult:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from rich import filesize

    from mlxft.ui import console

    cache, endpoint = hub_cache_dir(), hub_endpoint()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    except _network_errors() as exc:
        raise ModelError(f"{repo}: cannot reach the Hub at {endpoint} ({_describe(exc)})",
                         "check the network; models already in the cache work offline") from None
    commit = info.sha
    if not commit:
        raise ModelError(f"{repo}: the Hub answered without a commit hash")
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) or 0 for s in (info.siblings or [])}
    snapshot = repo_folder(repo, cache) / "snapshots" / commit
    present = set() if force else {name for name in sizes if (snapshot / name).exists()}
    with _progress(f"{repo} @ {commit[:7]}") as bar_class:

        def fetch(name: str) -> Path:
            return Path(hf_hub_download(repo, name, revision=commit, cache_dir=cache, endpoint=endpoint,
                                        force_download=force, tqdm_class=bar_class))

        files = select_files(repo, list(sizes), lambda: json.loads(fetch(INDEX).read_text()))
        check_trainable(_read_json(fetch("config.json"), repo, "config.json"), repo)
        # a branch or tag (not a commit) makes the library record it under refs/
        path = Path(snapshot_download(repo, revision=revision or "main", allow_patterns=files, cache_dir=cache,
                                      endpoint=endpoint, force_download=force, tqdm_class=bar_class))
    if path.name != commit:
        raise ModelError(f"{repo}: '{revision or 'main'}' moved on the Hub during the pull", "run the pull again")
    for name in files:
        if name.endswith(".safetensors"):
            problem = safetensors_problem(path / name)
            if problem:
                raise ModelError(f"{repo}: {name} is {problem}")
    todo = [name for name in files if name not in present]
    if not todo:
        return PullResult(repo, commit, path, files, cached=True)
    downloaded = sum(sizes.get(name, 0) for name in todo)
    console.print(f"Pulled {repo} @ {commit[:12]}: {len(files)} files, "
                  f"{filesize.decimal(downloaded)} downloaded", style="dim")
    return PullResult(repo, commit, path, files, downloaded)


@contextmanager
def _progress(label: str):
    """A tqdm class for huggingface_hub's `tqdm_class` hook that counts but never prints: rich
    draws the pull's bytes as one bar on mlxft's console (nothing when stderr is not a terminal)."""
    from huggingface_hub.utils import tqdm as hf_tqdm
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from mlxft.ui import console, is_interactive

    progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=console, disable=not is_interactive())

    class RichBar(hf_tqdm):
        def __init__(self, *args, **kwargs):
            # snapshot_download's bar of bytes written, and the bar of a lone hf_hub_download; not
            # snapshot_download's network-bytes or file-count bars
            file_name = str(kwargs.get("desc")).rsplit("/", 1)[-1]
            shown = {"huggingface_hub.snapshot_download": label, "huggingface_hub.http_get": f"  {file_name}"}
            description = shown.get(kwargs.get("name"))
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.task = progress.add_task(description, total=self.total or None, completed=self.n) \
                if description and kwargs.get("unit") == "B" else None

        def update(self, n=1):
            self.n += n or 0  # a disabled tqdm does not count
            self.refresh()

        def refresh(self, *args, **kwargs):
            if self.task is not None:
                progress.update(self.task, total=self.total or None, completed=self.n)

    with progress:
        yield RichBar


def _snapshots(storage: Path) -> set[str]:
    folder = storage / "snapshots"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _undo(storage: Path, before: set[str] | None) -> None:
    """Remove what a pull refused as bad input added to the cache: the repo's folder when the pull
    created it, else the revisions it added (with their refs, through scan_cache_dir)."""
    if not storage.exists():
        return
    if before is None:
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(storage.parent / ".locks" / storage.name, ignore_errors=True)
        return
    added = _snapshots(storage) - before
    if added:
        from huggingface_hub import scan_cache_dir

        scan_cache_dir(storage.parent).delete_revisions(*added).execute()


def _read_json(path: Path, repo: str, name: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{repo}: {name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{repo}: {name} is not a JSON object")
    return data


def safetensors_problem(path: Path) -> str | None:
    """None for a safetensors file the library opens (it checks that the header is whole and
    describes the file to its last byte), else 'truncated or corrupt (...)'."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as fh:
            fh.keys()
    except Exception as exc:  # safetensors' own SafetensorError, OSError
        return f"truncated or corrupt ({_describe(exc)})"
    return None
