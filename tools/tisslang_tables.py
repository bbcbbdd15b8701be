"""Write TissLang's parse tables (src/tisslm/agent/grammar_tables.json) after grammar.lark changes.

The parser loads them instead of computing them at every start (`tisslm.agent.parser._lark`); tables
made from another grammar, lark version or options are ignored, so a stale file costs only time, and
`tests/test_tisslang_parser.py::test_the_shipped_parse_tables_are_those_of_the_grammar` fails
until this is run. Usage: python tools/tisslang_tables.py
"""

from __future__ import annotations

import json

from tisslm.agent.parser import GRAMMAR, PARSE_TABLES, parse_tables
from tisslm.core.io import atomic_write_text


def main() -> None:
    atomic_write_text(PARSE_TABLES, json.dumps(parse_tables(GRAMMAR.read_text()), separators=(",", ":")) + "\n")
    print(f"wrote {PARSE_TABLES.name} for {GRAMMAR.name}")


if __name__ == "__main__":
    main()
