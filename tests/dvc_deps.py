"""Which project files each dvc.yaml stage runs but does not declare as a dep.

A stage's code is the closure of `python -m stages.<name>` over project imports: the modules it
imports, theirs, and the packages that hold them (importing a.b.c runs a/__init__.py and
a/b/__init__.py). grimp reads every import statement, those inside functions included.
Run as a script in a project's root: prints the undeclared files per stage as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import grimp
import yaml

PACKAGES = ("tisslm", "stages")


def imported_files(graph: grimp.ImportGraph, module: str, root: Path) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += graph.find_modules_directly_imported_by(name)
    return {Path(importlib.util.find_spec(name).origin).resolve().relative_to(root).as_posix() for name in seen}


def undeclared(root: Path) -> dict[str, list[str]]:
    """{stage: project files it imports that none of its deps covers} for every stage of root/dvc.yaml."""
    root = root.resolve()
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    missing = {}
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        module = stage["cmd"].split()[2]  # python -m stages.<name> ...
        deps = [Path(d).as_posix() for d in stage.get("deps", [])]
        files = imported_files(graph, module, root)
        missing[name] = sorted(f for f in files if not any(f == d or f.startswith(f"{d}/") for d in deps))
    return missing


if __name__ == "__main__":
    root = Path.cwd()
    sys.path[:0] = [str(root), str(root / "src")]
    print(json.dumps(undeclared(root)))
