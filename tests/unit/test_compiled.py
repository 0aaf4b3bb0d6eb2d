"""The compiled core (lotflow/compiled.py, lotflow/compile_core.py): used only when built for this
interpreter from today's sources, and deciding exactly as the sources do."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lotflow import compile_core, compiled
from lotflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "load-tests"))

import stages  # noqa: E402  (load-tests/stages.py)

BUILT = compiled.build_problem(compiled.read_manifest())
_ADDRESS = re.compile(rb"0x[0-9a-f]{6,}")
needs_build = pytest.mark.skipif(BUILT is not None, reason=f"the compiled core is not built here: {BUILT}")


def _build(tmp_path: Path, **change: Any) -> dict[str, Any]:
    """A manifest of a made-up build in ``tmp_path``, for ``compiled.build_problem``."""
    source = tmp_path / "source.py"
    source.write_text("x = 1\n")
    modules = {name: f"{name}.so" for name in compiled.MODULES}
    for file in [*modules.values(), "shared.so"]:
        (tmp_path / file).write_bytes(b"")
    manifest = {"extension_suffix": compiled.EXTENSION_SUFFIX, "modules": modules,
                "shared": {"name": "abc__mypyc", "file": "shared.so"},
                "sources": {str(source): hashlib.sha256(b"x = 1\n").hexdigest()}}
    manifest.update(change)
    return manifest


def test_a_build_is_used_only_for_this_interpreter_and_todays_sources(tmp_path: Path) -> None:
    assert compiled.build_problem(_build(tmp_path), tmp_path) is None
    assert "not built" in str(compiled.build_problem(None, tmp_path))
    assert "this interpreter loads" in str(compiled.build_problem(
        _build(tmp_path, extension_suffix=".cpython-312-x86_64-linux-gnu.so"), tmp_path))
    assert "another set of modules" in str(compiled.build_problem(
        _build(tmp_path, modules={"lotflow.scorers.spc": "x.so"}), tmp_path))
    manifest = _build(tmp_path)
    (tmp_path / "shared.so").unlink()
    assert "shared.so is missing" in str(compiled.build_problem(manifest, tmp_path))
    manifest = _build(tmp_path)
    (tmp_path / "source.py").write_text("x = 2\n")  # any file of the package, not only a core module
    assert "changed since the core was compiled" in str(compiled.build_problem(manifest, tmp_path))
    (tmp_path / "source.py").unlink()
    assert "is gone" in str(compiled.build_problem(manifest, tmp_path))


def test_the_build_hashes_every_file_of_the_package_in_its_installed_layout(tmp_path: Path) -> None:
    files = compile_core.package_files()
    assert files[Path("lotflow/streams/receiving.py")] == ROOT / "streams" / "receiving.py"
    assert files[Path("lotflow/verification/receiving.py")] == ROOT / "lotflow" / "verification" / "receiving.py"
    assert files[Path("lotflow/cli.py")] == ROOT / "lotflow" / "cli.py"
    assert all(Path(*m.split(".")).with_suffix(".py") in files for m in compiled.MODULES)
    assert not any("_compiled" in str(path) or "__pycache__" in str(path) for path in files)
    compile_core.lay_out(tmp_path / "tree", files, link=True)
    assert (tmp_path / "tree" / "lotflow" / "scorers" / "spc.py").resolve() == ROOT / "scorers" / "spc.py"


def _in_child(code: str, *, pure: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    if pure:
        env[compiled.PURE_ENV] = "1"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


STATUS = ("import json, lotflow.compiled as c, lotflow.streams.receiving, lotflow.scorers.spc as s; "
          "print(json.dumps({**c.status(), 'origin': s.__spec__.origin}))")


def test_pure_python_on_request_runs_every_module_of_the_core_from_its_source() -> None:
    status = _in_child(STATUS, pure=True)
    assert status["compiled"] is False and status["extensions_loaded"] == 0
    assert status["modules_loaded"] == len(compiled.MODULES)  # the processor imports every one
    assert str(status["origin"]).endswith("spc.py")


@needs_build
def test_a_current_build_serves_the_core_and_a_stale_one_the_sources(tmp_path: Path) -> None:
    status = _in_child(STATUS, pure=False)
    assert status["compiled"] is True and status["extensions_loaded"] == status["modules_loaded"] == len(
        compiled.MODULES)
    assert str(status["origin"]).startswith(str(compiled.COMPILED_DIR))
    # a copy of the build, decided on afresh in a child: as built, then with one source changed
    stale = tmp_path / "build"
    shutil.copytree(compiled.COMPILED_DIR, stale)
    decide = ("import json, os, warnings; from pathlib import Path; import lotflow.compiled as c; "
              "os.environ.pop(c.PURE_ENV); c._state['reason'] = 'not decided'; "
              "warnings.simplefilter('always'); w = warnings.catch_warnings(record=True); caught = w.__enter__(); "
              f"used = c.use_compiled_core(Path({str(stale)!r})); import lotflow.scorers.spc as s; "
              "print(json.dumps({'used': used, 'warned': [str(x.message) for x in caught], "
              "'origin': s.__spec__.origin}))")
    fresh = _in_child(decide, pure=True)
    assert fresh["used"] is True and not fresh["warned"] and str(fresh["origin"]).startswith(str(stale))
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["sources"][str(ROOT / "lotflow" / "settings.py")] = "0" * 64  # an import of the core changed
    (stale / "manifest.json").write_text(json.dumps(manifest))
    changed = _in_child(decide, pure=True)
    assert changed["used"] is False and str(changed["origin"]).endswith("spc.py")
    assert any("settings.py changed since the core was compiled" in w for w in changed["warned"])


def _hostile(events: list[Any], seed: int) -> list[Any]:
    """The traffic with a bit flipped in 5 % of the records, 2 % cut short, 3 % delivered twice."""
    rng = random.Random(seed)
    out = []
    for event in events:
        draw = rng.random()
        value = event.value
        if draw < 0.05 and value:
            flipped = bytearray(value)
            flipped[rng.randrange(5, len(flipped))] ^= 1 << rng.randrange(8)
            event = replace(event, value=bytes(flipped))
        elif draw < 0.07 and value:
            event = replace(event, value=value[:rng.randrange(5, len(value))])
        out.append(event)
        if draw > 0.97:
            out.append(event)
    return out


def _outputs_digest(receipts: int, hostile: bool = False) -> str:
    """Every output and changelog record of the processor over the bench's traffic (fixed clock);
    ``hostile``: with corrupt, truncated and repeated records."""
    settings = Settings()
    events, specs = stages.traffic(settings, receipts, start_ms=1_780_000_000_000)
    if hostile:
        events = _hostile(events, 5)
    clock = stages._Clock()
    outputs: list[Any] = []
    processor = stages._processor(settings, specs, settings.topic("test.changelog"), clock, outputs.append)
    digest = hashlib.sha256()
    records = 0
    for _ in stages._batches(processor, events, settings.batch_size, clock):
        processor.end_batch()
        stages._changes_into(processor, outputs)
        for m in outputs:
            # a dead letter's reason may quote an object's address: the same in either, but per process
            digest.update(_ADDRESS.sub(b"0x_", repr((m.topic, m.key, m.value, m.partition)).encode()))
        records += len(outputs)
        outputs.clear()
    assert records > 3 * receipts  # outputs and state of every receipt
    return digest.hexdigest()


@needs_build
@pytest.mark.parametrize("hostile", [False, True])
def test_the_compiled_core_decides_exactly_as_its_sources(hostile: bool) -> None:
    assert compiled.status()["compiled"], compiled.status()
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'tests' / 'unit')!r}); "
            "import lotflow.compiled as c; from test_compiled import _outputs_digest; "
            f"digest = _outputs_digest(400, {hostile}); print(json.dumps({{**c.status(), 'digest': digest}}))")
    pure = _in_child(code, pure=True)
    assert pure["extensions_loaded"] == 0 and pure["modules_loaded"] == len(compiled.MODULES)
    assert _outputs_digest(400, hostile) == pure["digest"]
    assert compiled.status()["extensions_loaded"] == len(compiled.MODULES)  # it was the compiled core here
