"""Models from the Hugging Face Hub, kept in the standard HF cache (HF_HOME / HF_HUB_CACHE).

`pull_model` fetches only what a fine-tune needs: safetensors weights and their index, config,
tokenizer files, chat template, generation config. Pickle weights (.bin, .pt) are never fetched.
huggingface_hub does the listing (model_info), the per-file metadata (HEAD /resolve: commit,
ETag, size, CDN redirect), the byte transfer (`http_get`: Range requests, retries) and defines the
cache layout (blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/<revision>). Unlike
`hf_hub_download`, which deletes a partial file when a download fails, a partial download stays
at blobs/<etag>.incomplete so the next pull resumes where the last one stopped; every finished
file is checked against the Hub's checksum (sha256 for LFS files, git blob sha1 otherwise).

Environment honoured at call time: HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

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
    """(snapshot folder, commit) for a complete cached copy of `repo` at `revision`, else None."""
    storage = repo_folder(repo)
    revision = revision or "main"
    if COMMIT_RE.match(revision):
        commit = revision
    else:
        ref = storage / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit
    if snapshot.is_dir() and snapshot_problem(snapshot) is None:
        return snapshot, commit
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
    downloaded: int = 0   # bytes fetched by this pull
    cached: bool = False  # nothing had to be fetched


def _hub_errors():
    from huggingface_hub import errors

    return errors


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
    HF cache and return where it is. Resumes partial downloads; cleans up after bad input."""
    if is_offline():
        found = cached_snapshot(repo, revision)
        if found:
            return PullResult(repo, found[1], found[0], cached=True)
        raise ModelError(f"{repo}: cannot pull while HF_HUB_OFFLINE=1 and it is not in the cache "
                         f"({hub_cache_dir()})", "unset HF_HUB_OFFLINE to download it")
    errors = _hub_errors()
    cache = hub_cache_dir()
    storage = repo_folder(repo, cache)
    endpoint = hub_endpoint()
    before = _cache_state(storage)
    try:
        return _pull(repo, revision, cache, storage, endpoint, force)
    except errors.GatedRepoError:
        _cleanup(storage, before)
        raise ModelError(f"{repo}: gated repo, and {'HF_TOKEN has no access' if os.environ.get('HF_TOKEN') else 'no token is set'}",
                         "accept its terms on the Hub, then set HF_TOKEN or run `hf auth login`") from None
    except errors.RevisionNotFoundError:
        _cleanup(storage, before)
        raise ModelError(f"{repo}: revision '{revision}' not found on the Hub") from None
    except errors.RepositoryNotFoundError:
        _cleanup(storage, before)
        raise ModelError(f"{repo}: no such model on the Hub (404)",
                         "check the name; for a private repo set HF_TOKEN") from None
    except errors.RemoteEntryNotFoundError as exc:
        _cleanup(storage, before)
        raise ModelError(f"{repo}: a listed file is missing on the Hub ({_describe(exc)})") from None
    except ModelError:
        _cleanup(storage, before)
        raise
    except errors.OfflineModeIsEnabled:
        raise ModelError(f"{repo}: cannot pull: huggingface_hub is in offline mode (HF_HUB_OFFLINE)") from None
    except (errors.HfHubHTTPError, *_network_errors(), OSError) as exc:
        if isinstance(exc, (errors.HfHubHTTPError, *_network_errors())) or "Consistency check" in str(exc):
            raise ModelError(f"{repo}: download interrupted ({_describe(exc)}) from {endpoint}",
                             f"run `mlxft pull {repo}` again to resume") from None
        raise


def _pull(repo, revision, cache: Path, storage: Path, endpoint: str, force: bool) -> PullResult:
    from huggingface_hub import HfApi
    from rich import filesize

    from mlxft.ui import console

    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    except _network_errors() as exc:
        raise ModelError(f"{repo}: cannot reach the Hub at {endpoint} ({_describe(exc)})",
                         "check the network; models already in the cache work offline") from None
    commit = info.sha
    if not commit:
        raise ModelError(f"{repo}: the Hub answered without a commit hash")
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in (info.siblings or [])}
    snapshot = storage / "snapshots" / commit
    downloader = _Downloader(repo, commit, cache, storage, endpoint)
    files = select_files(repo, list(sizes), lambda: json.loads(downloader.fetch(INDEX).read_text()))
    if revision is None or not COMMIT_RE.match(revision):
        _write_ref(storage, revision or "main", commit)
    todo = [f for f in files if force or not (snapshot / f).exists()]
    if not todo:
        return PullResult(repo, commit, snapshot, files, cached=True)
    total = sum(sizes.get(f) or 0 for f in files)
    with downloader.progress(f"{repo} @ {commit[:7]}", total) as bars:
        bars.advance_overall(sum(sizes.get(f) or 0 for f in files if f not in todo))
        for name in files:
            path = downloader.fetch(name, force=force and name in todo)
            if name == "config.json":
                check_trainable(_read_json(path, repo, name), repo)
    for name in files:
        if name.endswith(".safetensors"):
            problem = safetensors_problem(snapshot / name)
            if problem:
                raise ModelError(f"{repo}: {name} is {problem}")
    console.print(f"Pulled {repo} @ {commit[:12]}: {len(files)} files, "
                  f"{filesize.decimal(downloader.downloaded)} downloaded", style="dim")
    return PullResult(repo, commit, snapshot, files, downloader.downloaded)


def _read_json(path: Path, repo: str, name: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{repo}: {name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{repo}: {name} is not a JSON object")
    return data


def safetensors_problem(path: Path) -> str | None:
    """None for a readable safetensors file, else 'truncated or corrupt (...)'."""
    from safetensors import safe_open

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "truncated or corrupt (shorter than a safetensors header)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"truncated or corrupt (header of {n} bytes in a {size}-byte file)"
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            return f"truncated or corrupt ({size} bytes; the header describes {8 + n + max(ends, default=0)})"
        with safe_open(str(path), "np") as fh:
            list(fh.keys())
    except Exception as exc:  # JSON, KeyError, safetensors' own SafetensorError
        return f"truncated or corrupt ({_describe(exc)})"
    return None


# --- cache bookkeeping ---------------------------------------------------------------------------

def _write_ref(storage: Path, revision: str, commit: str) -> None:
    from mlxft.atomic import atomic_file

    ref = storage / "refs" / revision
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    with atomic_file(ref, "w") as fh:
        fh.write(commit)


def _cache_state(storage: Path) -> dict:
    """What existed before a pull, so a failed one can remove exactly what it added."""
    if not storage.exists():
        return {"exists": False}
    listing = lambda sub: {p.name for p in (storage / sub).iterdir()} if (storage / sub).is_dir() else set()  # noqa: E731
    refs = {}
    if (storage / "refs").is_dir():
        refs = {str(p.relative_to(storage / "refs")): p.read_text() for p in (storage / "refs").rglob("*") if p.is_file()}
    return {"exists": True, "snapshots": listing("snapshots"), "blobs": listing("blobs"), "refs": refs}


def _cleanup(storage: Path, before: dict) -> None:
    """Undo what a failed pull added to the cache (bad input: nothing half-written stays)."""
    if not storage.exists():
        return
    if not before["exists"]:
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(storage.parent / ".locks" / storage.name, ignore_errors=True)
        return
    for sub, kind in (("snapshots", "dir"), ("blobs", "file")):
        folder = storage / sub
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name not in before[sub]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    refs = storage / "refs"
    if refs.is_dir():
        for p in list(refs.rglob("*")):
            key = str(p.relative_to(refs))
            if p.is_file():
                if key not in before["refs"]:
                    p.unlink()
                elif p.read_text() != before["refs"][key]:
                    p.write_text(before["refs"][key])


# --- the downloader -------------------------------------------------------------------------------

class _Downloader:
    """Fetches one repo file at one commit into the HF cache layout, resumably."""

    def __init__(self, repo: str, commit: str, cache: Path, storage: Path, endpoint: str):
        self.repo, self.commit, self.cache, self.storage, self.endpoint = repo, commit, cache, storage, endpoint
        self.downloaded = 0
        self._bars = None

    def progress(self, label: str, total: int):
        self._bars = _Bars(label, total)
        return self._bars

    def fetch(self, name: str, force: bool = False) -> Path:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import WeakFileLock, build_hf_headers

        pointer = self.storage / "snapshots" / self.commit / name
        if pointer.exists() and not force:
            return pointer
        url = hf_hub_url(self.repo, name, revision=self.commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, endpoint=self.endpoint)
        bar = self._bars.file_bar(name) if self._bars else None
        if meta.xet_file_data is not None and _xet_available():
            # Xet storage: its own chunk cache makes re-downloads cheap; let the library do it.
            path = hf_hub_download(self.repo, name, revision=self.commit, cache_dir=str(self.cache),
                                   endpoint=self.endpoint, force_download=force, tqdm_class=bar)
            self.downloaded += meta.size or 0
            return Path(path)
        if not meta.etag:
            raise ModelError(f"{self.repo}: the Hub gave no ETag for {name}")
        blob = self.storage / "blobs" / meta.etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        lock = self.cache / ".locks" / self.storage.name / f"{meta.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(str(lock)):
            if force or not blob.exists():
                partial = blob.with_name(blob.name + ".incomplete")
                resume = partial.stat().st_size if partial.exists() and not force else 0
                if meta.size is not None and resume > meta.size:
                    resume = 0
                headers = build_hf_headers()
                if urlparse(meta.location).netloc != urlparse(url).netloc:
                    headers.pop("authorization", None)  # signed CDN url: the token stays on the Hub
                with open(partial, "r+b" if resume else "wb") as fh:
                    fh.seek(resume)
                    fh.truncate()
                    start = resume
                    http_get(meta.location, fh, resume_size=resume, headers=headers,
                             expected_size=meta.size, displayed_filename=name, tqdm_class=bar)
                    self.downloaded += fh.tell() - start
                if not _matches_etag(partial, meta.etag):
                    partial.unlink(missing_ok=True)
                    raise ModelError(f"{self.repo}: {name} does not match the Hub's checksum after download",
                                     "run the pull again")
                os.replace(partial, blob)
            elif bar is not None:
                b = bar(total=blob.stat().st_size, initial=blob.stat().st_size)
                b.close()
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _link(blob, pointer)
        return pointer


def _xet_available() -> bool:
    try:
        from huggingface_hub.utils._runtime import is_xet_available
    except ImportError:
        return False
    return is_xet_available()


def _matches_etag(path: Path, etag: str) -> bool:
    """LFS files: the ETag is the sha256; regular files: the git blob sha1. Else unchecked."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        h = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        h = hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    else:
        return True
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest() == etag


def _link(blob: Path, pointer: Path) -> None:
    tmp = pointer.with_name(f".{pointer.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), tmp)
    except OSError:  # no symlinks (some Windows setups): copy, as huggingface_hub does
        shutil.copyfile(blob, tmp)
    os.replace(tmp, pointer)


class _Bars:
    """Rich progress: one bar per file plus an overall bar; silent when stderr is not a terminal.
    `file_bar(name)` is a tqdm-like factory that huggingface_hub's http_get drives."""

    def __init__(self, label: str, total: int):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        from mlxft.ui import console, is_interactive

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                                 disable=not is_interactive())
        self.overall = self.progress.add_task(f"[bold]{label}", total=total or None)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def advance_overall(self, n: int) -> None:
        self.progress.advance(self.overall, n)

    def file_bar(self, name: str):
        bars = self

        class _FileBar:
            def __init__(self, total=None, initial=0, **_):
                self.task = bars.progress.add_task(f"  {name}", total=total, completed=initial)
                bars.progress.advance(bars.overall, initial or 0)

            def update(self, n=1):
                bars.progress.advance(self.task, n or 0)
                bars.progress.advance(bars.overall, n or 0)

            def update_transfer(self, n=1):
                pass

            def set_postfix_str(self, *a, **k):
                pass

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

        return _FileBar
