"""Build the compiled core (``lotflow.compiled``): ``python -m lotflow.compile_core [--clean]``.

mypyc type-checks and compiles ``compiled.MODULES`` into C extensions written beside their
sources, and one shared library (the modules' common runtime) into this interpreter's
site-packages. It needs mypy (a dev dependency) and a C compiler; without them, or on any build
error, it says why, removes what a failed build left, and lotflow runs from its sources.

The sources live in ``streams/``, ``scorers/``, ... and are installed under ``lotflow.*`` by a
package-dir mapping that mypyc cannot follow, so the build runs in ``var/compile``: a tree of
links laid out as the installed package (the same as ``make lint`` type-checks).
Up to date already (the manifest matches every source): nothing is done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from lotflow import compiled

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"lotflow.streams": "streams", "lotflow.schemas": "schemas", "lotflow.scorers": "scorers",
         "lotflow.sinks": "sinks"}
# Third-party packages are not followed: their types are not needed to compile lotflow's code,
# and analysing them (numpy, scipy, river, faust) takes minutes.
_MYPY_INI = """[mypy]
python_version = 3.11
ignore_missing_imports = True
[mypy-faust.*,mode.*,aiokafka.*,river.*,numpy.*,scipy.*,sklearn.*,pandas.*,confluent_kafka.*,fastavro.*,pint.*,\
clickhouse_connect.*,prometheus_client.*,pydantic.*,pydantic_settings.*,orjson.*,aiohttp.*,fastapi.*,starlette.*,\
jinja2.*,matplotlib.*]
follow_imports = skip
"""
EXTENSION_SUFFIX = str(sysconfig.get_config_var("EXT_SUFFIX"))


def source_of(module: str) -> Path:
    """The ``.py`` file of a ``lotflow.*`` module in this checkout."""
    parts = module.split(".")
    for package, directory in PARTS.items():
        if module.startswith(package + "."):
            return ROOT / directory / Path(*module[len(package) + 1:].split(".")).with_suffix(".py")
    return ROOT / Path(*parts).with_suffix(".py")


def extension_of(module: str) -> Path:
    source = source_of(module)
    return source.with_name(source.stem + EXTENSION_SUFFIX)


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def clean(say: bool = True) -> int:
    """Remove the extensions, the shared library and the manifest: lotflow runs from its sources."""
    removed = 0
    manifest = compiled._manifest()
    shared = manifest.get("shared_library") if manifest else None
    paths = [extension_of(m) for m in compiled.MODULES] + ([Path(str(shared))] if shared else [])
    for path in [*paths, compiled.MANIFEST]:
        if path.exists():
            path.unlink()
            removed += 1
    if say:
        print(f"compiled core: removed {removed} files; lotflow runs from its sources")
    return removed


def _up_to_date() -> bool:
    manifest = compiled._manifest()
    return manifest is not None and compiled._why_not(manifest) is None


def _link_tree(build: Path) -> None:
    """``build/lotflow``: lotflow's files, and its parts where the installed package has them."""
    if build.exists():
        shutil.rmtree(build)
    package = build / "lotflow"
    package.mkdir(parents=True)
    for entry in (ROOT / "lotflow").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, directory in PARTS.items():
        (package / name.rpartition(".")[2]).symlink_to(ROOT / directory, target_is_directory=True)


def build(var_dir: Path) -> int:
    """Compile the core; 0 when it is in use afterwards, 1 when lotflow runs from its sources."""
    if _up_to_date():
        print("compiled core: up to date")
        return 0
    clean(say=False)
    mypyc = Path(sys.executable).with_name("mypyc")
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not mypyc.exists() or compiler is None:
        print(f"compiled core: not built ({'mypyc' if not mypyc.exists() else 'a C compiler'} is missing); "
              "lotflow runs from its sources")
        return 1
    workdir = var_dir.resolve() / "compile"
    _link_tree(workdir)
    (workdir / "mypy.ini").write_text(_MYPY_INI)
    files = [str(Path("lotflow", *m.split(".")[1:]).with_suffix(".py")) for m in compiled.MODULES]
    digests = {m: compiled.source_digest(source_of(m)) for m in compiled.MODULES}
    print(f"compiled core: compiling {len(files)} modules with mypyc (~30-60 s) ...", flush=True)
    started = time.monotonic()
    log = workdir / "build.log"
    with log.open("wb") as out:
        done = subprocess.run([str(mypyc), "--config-file", "mypy.ini", *files], cwd=workdir,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    shared = sorted(workdir.glob(f"*__mypyc{EXTENSION_SUFFIX}"))
    missing = [m for m in compiled.MODULES if not extension_of(m).exists()]
    if done.returncode != 0 or len(shared) != 1 or missing:
        clean(say=False)
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        print(f"compiled core: build failed (exit {done.returncode}; see {log}); lotflow runs from its sources",
              *tail, sep="\n  ")
        return 1
    target = _site_packages() / shared[0].name
    shutil.copy2(shared[0], target)
    # the digests of the sources as they were when the build began: a file edited meanwhile is stale
    compiled.MANIFEST.write_text(json.dumps({
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
        "shared_library": str(target),
        "modules": {m: {"source": str(source_of(m)), "sha256": digests[m], "extension": str(extension_of(m))}
                    for m in compiled.MODULES},
    }, indent=1))
    print(f"compiled core: {len(files)} modules in {time.monotonic() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean", action="store_true", help="remove the compiled core: run from the sources")
    parser.add_argument("--var-dir", type=Path, default=ROOT / "var")
    args = parser.parse_args(argv)
    if args.clean:
        clean()
        return 0
    return build(args.var_dir)


if __name__ == "__main__":
    sys.exit(main())
