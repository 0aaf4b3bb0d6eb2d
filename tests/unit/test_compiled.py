"""The compiled core (lotflow/compiled.py): used only when built from the current sources, and
deciding exactly as the sources do."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lotflow import compiled
from lotflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "load-tests"))

import stages  # noqa: E402  (load-tests/stages.py)


def _manifest(tmp_path: Path, *, built_from: bytes = b"x = 1\n") -> dict[str, object]:
    modules = {}
    for name in compiled.MODULES:
        source = tmp_path / f"{name}.py"
        source.write_bytes(b"x = 1\n")
        extension = tmp_path / f"{name}.so"
        extension.write_bytes(b"")
        modules[name] = {"source": str(source), "extension": str(extension),
                         "sha256": hashlib.sha256(built_from).hexdigest()}
    return {"modules": modules}


def test_the_core_is_compiled_only_while_every_source_is_the_one_it_was_built_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    assert compiled._why_not(_manifest(tmp_path)) is None
    assert "changed since it was compiled" in str(compiled._why_not(_manifest(tmp_path, built_from=b"x = 2\n")))
    manifest = _manifest(tmp_path)
    Path(manifest["modules"]["lotflow.scorers.spc"]["extension"]).unlink()  # type: ignore[index]
    assert "missing" in str(compiled._why_not(manifest))
    assert "not built" in str(compiled._why_not(None))
    monkeypatch.setenv(compiled.PURE_ENV, "1")
    assert compiled._why_not(_manifest(tmp_path)) == f"{compiled.PURE_ENV} is set"


def test_the_source_finder_takes_only_the_cores_modules(tmp_path: Path) -> None:
    (tmp_path / "spc.py").write_text("x = 1\n")
    (tmp_path / "other.py").write_text("x = 1\n")
    spec = compiled._SourceFirst().find_spec("lotflow.scorers.spc", [str(tmp_path)])
    assert spec is not None and spec.origin == str(tmp_path / "spc.py")
    assert compiled._SourceFirst().find_spec("lotflow.scorers.other", [str(tmp_path)]) is None
    assert compiled._SourceFirst().find_spec("lotflow.scorers.spc", None) is None


def _status_in_child(pure: bool) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    if pure:
        env[compiled.PURE_ENV] = "1"
    code = ("import json, lotflow.compiled as c, lotflow.streams.receiving, lotflow.scorers.spc as s; "
            "print(json.dumps({**c.status(), 'spc': s.__file__}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


def test_pure_python_on_request_runs_every_module_of_the_core_from_its_source() -> None:
    status = _status_in_child(pure=True)
    assert status["compiled"] is False and status["extensions_loaded"] == 0
    assert str(status["spc"]).endswith("spc.py")


def _outputs_digest(receipts: int) -> str:
    """Every output and changelog record of the processor over the bench's traffic (fixed clock)."""
    settings = Settings()
    events, specs = stages.traffic(settings, receipts, start_ms=1_780_000_000_000)
    clock = stages._Clock()
    outputs: list[object] = []
    processor = stages._processor(settings, specs, settings.topic("test.changelog"), clock, outputs.append)
    digest = hashlib.sha256()
    for _ in stages._batches(processor, events, settings.batch_size, clock):
        processor.end_batch()
        stages._changes_into(processor, outputs)  # type: ignore[arg-type]
        for m in outputs:
            digest.update(repr((m.topic, m.key, m.value, m.partition)).encode())  # type: ignore[attr-defined]
        outputs.clear()
    return digest.hexdigest()


def test_the_compiled_core_decides_exactly_as_its_sources() -> None:
    if not compiled.active():
        pytest.skip(f"the compiled core is not in use here: {compiled.status()['reason']}")
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests' / 'unit')!r}); "
            "import lotflow.compiled as c; assert not c.active(); "
            "from test_compiled import _outputs_digest; print(_outputs_digest(400))")
    env = {**os.environ, compiled.PURE_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _outputs_digest(400) == done.stdout.strip()
