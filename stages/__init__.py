"""One thin entry point per DVC stage: `python -m stages.<name> --input PATH ... --output PATH`.

Each stage reads params.yaml, calls the library in `tisslm`, and writes its outputs and metrics.
Its paths come on the command line from dvc.yaml, the one place that names them beside the deps
and outs DVC checks. Nothing worth testing lives here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def stage_paths(
    description: str, names: Sequence[str], argv: Sequence[str] | None = None, optional: Sequence[str] = ()
) -> argparse.Namespace:
    """Parse `--name PATH` for each of `names` (all required) and of `optional` (None when not given)
    from `argv` (default: sys.argv)."""
    parser = argparse.ArgumentParser(description=description)
    for name in [*names, *optional]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, required=name in names, metavar="PATH")
    return parser.parse_args(argv)
