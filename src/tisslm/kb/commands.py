"""`tisslm kb`: build, search and describe a knowledge base.

    tisslm kb build --dir src --include '**/*.py' --exclude 'tests/' --out models/kb
    tisslm kb build --clean data/clean --val-fraction 0.05 --out models/kb
    tisslm kb search --kb models/kb --k 5 --json "decode a JSON document"
    tisslm kb stats --kb models/kb --json

Errors are TissLMError: one line on stderr and exit status 2 (the main CLI's run_main).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tisslm.core.choices import SEARCH_MODES
from tisslm.core.errors import TissLMError

# The retrieval stack and the params schema load inside each command: `tisslm --help` and `kb search`
# pay only for what they use.

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Knowledge base: build, search and describe a retrieval index.",
)

KbDir = Annotated[Path, typer.Option("--kb", help="The knowledge base directory (what `kb build --out` wrote).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


@app.command("build")
def build_command(
    out: Annotated[Path, typer.Option("--out", help="The index directory (created or updated in place).")],
    directory: Annotated[Path | None, typer.Option("--dir", help="Index files under this directory.")] = None,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", metavar="GLOB", help="gitignore-style glob of files to take (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="GLOB", help="gitignore-style glob of files to leave out (repeatable)."),
    ] = None,
    clean: Annotated[
        Path | None, typer.Option("--clean", help="Index the train split of a clean corpus (data/clean).")
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            "--val-fraction",
            help="The held-out share the tokenize stage uses, not indexed [default: the schema's tokenize.val_fraction].",
        ),
    ] = None,
    no_tests: Annotated[
        bool, typer.Option("--no-tests", help="Leave test files out (indexed, searches down-weight them).")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Create or update an index: only documents whose text changed are re-chunked and re-embedded."""
    if (directory is None) == (clean is None):
        raise TissLMError("kb build: give exactly one of --dir PATH or --clean PATH")
    if clean is None and val_fraction is not None:
        raise TissLMError("kb build: --val-fraction applies to --clean only")
    if clean is not None and (include or exclude):
        raise TissLMError("kb build: --include/--exclude apply to --dir only")
    from tisslm.kb.build import DEFAULT_INCLUDE, build_index

    split = {} if val_fraction is None else {"val_fraction": val_fraction}
    report = build_index(
        out,
        directory=directory,
        include=include or DEFAULT_INCLUDE,
        exclude=exclude or (),
        clean=clean,
        index_tests=not no_tests,
        **split,
    )
    if as_json:
        print(json.dumps(report, indent=2))
        return
    skipped = ", ".join(f"{n} {reason}" for reason, n in report["skipped"].items()) or "none"
    print(
        f"{report['index']}: {report['documents']} documents, {report['chunks']} chunks "
        f"(added {report['added']}, updated {report['updated']}, removed {report['removed']}, "
        f"unchanged {report['unchanged']}; skipped: {skipped}) in {report['seconds']:.1f} s"
    )


@app.command("search")
def search_command(
    query: Annotated[str, typer.Argument(help="What to look for, in words or identifiers.")],
    kb: KbDir,
    k: Annotated[int, typer.Option("--k", help="How many hits.")] = 10,
    mode: Annotated[str, typer.Option("--mode", help=f"One of {', '.join(SEARCH_MODES)}.")] = "fused",
    as_json: AsJson = False,
) -> None:
    """The best chunks for QUERY, best first."""
    from tisslm.kb.index import KnowledgeBase

    with KnowledgeBase.open(kb) as base:
        hits = base.search(query, k=k, mode=mode)
    if as_json:
        print(json.dumps([h.to_json() for h in hits], indent=2))
        return
    for rank, hit in enumerate(hits, start=1):
        first = next((line.strip() for line in hit.text.splitlines() if line.strip()), "")
        print(
            f"{rank:>2}. {hit.score:.4f}  {hit.path}:{hit.start_line}-{hit.end_line}  {hit.name}\n      {first[:100]}"
        )


@app.command("stats")
def stats_command(kb: KbDir, as_json: AsJson = False) -> None:
    """What the index holds: documents, chunks, bytes, when it was built, the embedding model."""
    from tisslm.kb.index import KnowledgeBase

    with KnowledgeBase.open(kb) as base:
        stats = base.stats()
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    for key, value in stats.items():
        print(f"{key:>16}: {value}")
