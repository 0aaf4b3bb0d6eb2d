"""Build the compiled core (``lotflow.compiled``): ``python -m lotflow.compile_core [--clean]``.

mypyc type-checks and compiles ``compiled.MODULES`` into C extensions and one shared runtime
library, which go to ``compiled.COMPILED_DIR`` with a manifest: the interpreter's extension
suffix, and the SHA-256 of every Python file of lotflow as compiled. Up to date already (the
manifest fits): nothing is done.

The sources live in ``streams/``, ``scorers/``, ... and are installed under ``lotflow.*`` by the
package-dir mapping in pyproject.toml, which mypy cannot follow. So the build compiles a copy
laid out as the installed package (``var/compile``; a copy, not links, so that what is hashed is
what was compiled even if a file is edited meanwhile), and ``--link-tree DIR`` lays out the same
tree as links for ``make lint``'s mypy.

Exit status: 0 when the core is built or up to date, or when this machine cannot build it
(no mypyc, C compiler or Python headers: it says which, and lotflow runs from its sources);
1 when a build failed (a defect, like a type error: the log's tail is printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

from lotflow import compiled

ROOT = Path(__file__).resolve().parent.parent
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


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Package name -> its directory in the checkout, as pyproject.toml maps them."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {str(package): root / str(directory) for package, directory in mapping.items()}


def package_files(root: Path = ROOT) -> dict[Path, Path]:
    """Every Python file of lotflow: its path in the installed layout -> its file in the checkout."""
    dirs = package_dirs(root)
    files: dict[Path, Path] = {}
    # the longest package names last: a part's own directory wins over lotflow's tree
    for package in sorted(dirs, key=len):
        base = Path(*package.split("."))
        for source in sorted(dirs[package].rglob("*.py")):
            relative = source.relative_to(dirs[package])
            if any(part.startswith(("_compiled", "__pycache__")) for part in relative.parts):
                continue
            files[base / relative] = source
    return files


def lay_out(tree: Path, files: dict[Path, Path], *, link: bool) -> None:
    """``tree``: the files in the installed layout, as links to the checkout or as copies."""
    if tree.exists():
        shutil.rmtree(tree)
    for relative, source in files.items():
        target = tree / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            target.symlink_to(source)
        else:
            shutil.copyfile(source, target)


def clean(directory: Path = compiled.COMPILED_DIR, say: bool = True) -> None:
    """Remove the compiled core: lotflow runs from its sources."""
    shutil.rmtree(directory, ignore_errors=True)
    if say:
        print(f"compiled core: removed {directory}; lotflow runs from its sources")


def missing_tools() -> str | None:
    """What this machine lacks to build the core, or None."""
    if not Path(sys.executable).with_name("mypyc").exists():
        return "mypyc (pip install mypy)"
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        return "a C compiler (apt-get install gcc)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "the Python headers (apt-get install python3-dev)"
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools (pip install setuptools)"
    return None


def _mypy_version() -> str:
    try:
        from importlib.metadata import version
        return version("mypy")
    except Exception:  # not installed: the build says so before this matters
        return "unknown"


def build(var_dir: Path, directory: Path = compiled.COMPILED_DIR) -> int:
    if compiled.build_problem(compiled.read_manifest(directory), directory) is None:
        print("compiled core: up to date")
        return 0
    lacking = missing_tools()
    if lacking is not None:
        clean(directory, say=False)
        print(f"compiled core: not built, this machine lacks {lacking}; lotflow runs from its sources")
        return 0
    workdir = var_dir.resolve() / "compile"
    files = package_files()
    lay_out(workdir, files, link=False)
    (workdir / "mypy.ini").write_text(_MYPY_INI)
    digests = {str(source): compiled.source_digest(workdir / relative) for relative, source in files.items()}
    targets = {m: Path(*m.split(".")).with_suffix(".py") for m in compiled.MODULES}
    print(f"compiled core: compiling {len(targets)} modules with mypyc (~30-60 s) ...", flush=True)
    started = time.monotonic()
    log = var_dir.resolve() / "compile.log"
    with log.open("wb") as out:
        done = subprocess.run([str(Path(sys.executable).with_name("mypyc")), "--config-file", "mypy.ini",
                               *map(str, targets.values())], cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                              check=False)
    built = {m: workdir / path.with_suffix(compiled.EXTENSION_SUFFIX) for m, path in targets.items()}
    shared = sorted(workdir.glob(f"*__mypyc{compiled.EXTENSION_SUFFIX}"))
    if done.returncode != 0 or len(shared) != 1 or not all(f.is_file() for f in built.values()):
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        print(f"compiled core: the build failed (mypyc exit {done.returncode}; the log: {log})", *tail,
              sep="\n  ")
        return 1
    fresh = directory.with_name(directory.name + ".new")
    clean(fresh, say=False)
    fresh.mkdir()
    modules = {}
    for module, file in built.items():
        modules[module] = f"{module}{compiled.EXTENSION_SUFFIX}"
        shutil.copy2(file, fresh / modules[module])
    shutil.copy2(shared[0], fresh / shared[0].name)
    (fresh / compiled.MANIFEST.name).write_text(json.dumps({
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0], "mypy": _mypy_version(),
        "extension_suffix": compiled.EXTENSION_SUFFIX, "modules": modules,
        "shared": {"name": shared[0].name[:-len(compiled.EXTENSION_SUFFIX)], "file": shared[0].name},
        "sources": digests,
    }, indent=1))
    # swapped in whole: a process starting meanwhile sees the old build or the new one
    old = directory.with_name(directory.name + ".old")
    clean(old, say=False)
    if directory.exists():
        directory.rename(old)
    fresh.rename(directory)
    clean(old, say=False)
    print(f"compiled core: {len(modules)} modules in {time.monotonic() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean", action="store_true", help="remove the compiled core: run from the sources")
    parser.add_argument("--link-tree", type=Path, metavar="DIR",
                        help="only lay out lotflow as installed, as links, in DIR (for mypy)")
    parser.add_argument("--var-dir", type=Path, default=ROOT / "var")
    args = parser.parse_args(argv)
    if args.clean:
        clean()
        return 0
    if args.link_tree is not None:
        lay_out(args.link_tree, package_files(), link=True)
        return 0
    return build(args.var_dir)


if __name__ == "__main__":
    sys.exit(main())
