"""The compiled core: the receiving processor's pure modules as C extensions, or Python.

``python -m lotflow.compile_core`` (run by ``make install``) compiles ``MODULES`` with mypyc
into extension modules beside their sources; Python then imports those instead of the ``.py``
files. Measured on the stage harness, alternating: the processor ~1.35 x faster (README,
"Speed"). The sources stay the reference: everything runs without the compiled core.

A compiled module is only used while its source is the one it was compiled from: the build
writes the sources' SHA-256 into ``MANIFEST``, and ``use_compiled_core`` (called when ``lotflow``
is imported) checks it. If any source changed since, or ``LOTFLOW_PURE_PYTHON=1`` is set, every
module of the core is imported from its source. It is all or none: compiled modules call each
other directly, not through ``sys.modules``, so a mix would run stale code.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["MANIFEST", "MODULES", "active", "source_digest", "status", "use_compiled_core"]

# The processor's hot path, pure Python without Faust (streams/stages: ~80 % of the worker's time).
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
MANIFEST = Path(__file__).with_name("_compiled_core.json")
PURE_ENV = "LOTFLOW_PURE_PYTHON"

_state: dict[str, Any] = {"active": False, "reason": "not checked"}


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest() -> dict[str, Any] | None:
    try:
        data = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("modules"), dict) else None


def _why_not(manifest: dict[str, Any] | None) -> str | None:
    """None if every module's extension is built from its current source; else the reason."""
    if os.environ.get(PURE_ENV, "").strip() not in ("", "0"):
        return f"{PURE_ENV} is set"
    if manifest is None:
        return "not built (python -m lotflow.compile_core)"
    modules = manifest["modules"]
    for name in MODULES:
        entry = modules.get(name)
        if not isinstance(entry, dict):
            return f"{name} is not in the build"
        source, extension = Path(str(entry.get("source"))), Path(str(entry.get("extension")))
        if not extension.exists():
            return f"{extension} is missing"
        try:
            if source_digest(source) != entry.get("sha256"):
                return f"{source} changed since it was compiled (python -m lotflow.compile_core)"
        except OSError:
            return f"{source} is missing"
    return None


class _SourceFirst:
    """Finds the core's modules as their ``.py`` sources, ahead of the extensions beside them."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            candidate = os.path.join(entry, leaf + ".py")
            if os.path.exists(candidate):
                return importlib.util.spec_from_file_location(fullname, candidate)
        return None


_FINDER = _SourceFirst()


def use_compiled_core() -> bool:
    """Decide once per process, before any core module is imported: compiled or source."""
    if _FINDER in sys.meta_path or _state["reason"] != "not checked":
        return bool(_state["active"])
    manifest = _manifest()
    reason = _why_not(manifest)
    _state.update(active=reason is None, reason=reason or "compiled")
    if reason is not None:
        sys.meta_path.insert(0, _FINDER)
        if manifest is not None and not os.environ.get(PURE_ENV):
            warnings.warn(f"lotflow's compiled core is not used: {reason}", RuntimeWarning, stacklevel=2)
    return reason is None


def active() -> bool:
    """Whether the core's modules run compiled in this process."""
    return bool(_state["active"])


def status() -> dict[str, Any]:
    """For the bench and the worker's health: whether the core is compiled, and if not, why."""
    loaded = {name: getattr(sys.modules.get(name), "__file__", None) for name in MODULES if name in sys.modules}
    return {"compiled": active(), "reason": _state["reason"],
            "extensions_loaded": sum(1 for f in loaded.values() if f and not str(f).endswith(".py"))}
