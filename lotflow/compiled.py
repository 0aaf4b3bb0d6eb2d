"""The compiled core: the receiving processor's pure modules as C extensions, or Python.

``python -m lotflow.compile_core`` (run by ``make install``) compiles ``MODULES`` with mypyc.
The extensions and mypyc's shared runtime library go to ``COMPILED_DIR`` (never beside the
sources, never into site-packages), with a manifest of what they were built from. When
``lotflow`` is imported, ``use_compiled_core`` serves the core's modules from there, through a
finder of its own, only if the build is valid for this process:

* built for this interpreter (its extension suffix), every file of the build present;
* every Python file of lotflow as it was compiled (SHA-256 of each): compiled code has the
  types of what it imports built in, so a change anywhere in the package, not only in a core
  module, makes the build stale;
* ``LOTFLOW_PURE_PYTHON`` not set.

Otherwise everything runs from the sources, all of it: compiled modules call each other
directly, not through ``sys.modules``, so a mix could run stale code. Measured on the stage
harness, alternating runs: the processor ~1.35 x faster compiled (README, "The compiled core").
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["COMPILED_DIR", "EXTENSION_SUFFIX", "MANIFEST", "MODULES", "PURE_ENV", "active", "build_problem",
           "read_manifest", "source_digest", "status", "use_compiled_core"]

# The processor's hot path: pure Python, no Faust (~80 % of the worker's main thread, py-spy).
MODULES = (
    "lotflow.streams.receiving",
    "lotflow.streams.state",
    "lotflow.verification.receiving",
    "lotflow.verification.chain",
    "lotflow.verification.outputs",
    "lotflow.verification.explain",
    "lotflow.verification.units",
    "lotflow.scorers.spc",
    "lotflow.scorers.history",
)
COMPILED_DIR = Path(__file__).resolve().with_name("_compiled")
MANIFEST = COMPILED_DIR / "manifest.json"
PURE_ENV = "LOTFLOW_PURE_PYTHON"
EXTENSION_SUFFIX = str(sysconfig.get_config_var("EXT_SUFFIX"))

_state: dict[str, Any] = {"active": False, "reason": "not decided"}


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(directory: Path = COMPILED_DIR) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MANIFEST.name).read_text())
    except (OSError, ValueError):
        return None
    valid = isinstance(data, dict) and all(isinstance(data.get(k), dict) for k in ("modules", "sources", "shared"))
    return data if valid else None


def build_problem(manifest: dict[str, Any] | None, directory: Path = COMPILED_DIR) -> str | None:
    """None if the build in ``directory`` fits this interpreter and today's sources; else why not."""
    if manifest is None:
        return "not built (python -m lotflow.compile_core)"
    if manifest.get("extension_suffix") != EXTENSION_SUFFIX:
        return f"built for {manifest.get('extension_suffix')}, this interpreter loads {EXTENSION_SUFFIX}"
    if set(manifest["modules"]) != set(MODULES):
        return "built for another set of modules"
    for file in [*manifest["modules"].values(), manifest["shared"].get("file")]:
        if not (directory / str(file)).is_file():
            return f"{directory / str(file)} is missing"
    for source, digest in manifest["sources"].items():
        try:
            if source_digest(Path(source)) != digest:
                return f"{source} changed since the core was compiled (python -m lotflow.compile_core)"
        except OSError:
            return f"{source} is gone since the core was compiled"
    return None


class _CompiledFinder:
    """Serves the core's modules, and mypyc's shared library they import, from the build."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self._files = {name: directory / str(file) for name, file in manifest["modules"].items()}
        self._files[str(manifest["shared"]["name"])] = directory / str(manifest["shared"]["file"])

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        file = self._files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, str(file), loader=loader)


def use_compiled_core(directory: Path = COMPILED_DIR) -> bool:
    """Decide once per process, before any core module is imported: compiled or the sources."""
    if _state["reason"] != "not decided":
        return bool(_state["active"])
    manifest = read_manifest(directory)
    if os.environ.get(PURE_ENV, "").strip() not in ("", "0"):
        reason: str | None = f"{PURE_ENV} is set"
    else:
        reason = build_problem(manifest, directory)
        if reason is not None and manifest is not None:
            warnings.warn(f"lotflow's compiled core is not used: {reason}", RuntimeWarning, stacklevel=2)
    if reason is None and manifest is not None:
        sys.meta_path.insert(0, _CompiledFinder(directory, manifest))
    _state.update(active=reason is None, reason=reason or "compiled")
    return reason is None


def active() -> bool:
    """Whether this process serves the core's modules from the build."""
    return bool(_state["active"])


def status() -> dict[str, Any]:
    """Whether the core's modules loaded so far run compiled (and if not, why): for /metrics and the bench."""
    loaded = [sys.modules[name] for name in MODULES if name in sys.modules]
    compiled = [m for m in loaded if str(getattr(m.__spec__, "origin", "")).endswith(EXTENSION_SUFFIX)]
    return {"compiled": bool(loaded) and len(compiled) == len(loaded), "reason": _state["reason"],
            "modules_loaded": len(loaded), "extensions_loaded": len(compiled)}
