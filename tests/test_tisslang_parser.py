"""TissLang parser: every construct, heredoc fidelity, errors with line and column, the round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tisslm.agent import ast
from tisslm.agent.ast import NO_SPAN
from tisslm.agent.checks import check, parse_duration
from tisslm.agent.parser import TissSyntaxError, format_script, parse

REPO = Path(__file__).parents[1]


def body(text: str) -> tuple:
    return parse("#TISS!\n" + text).body


def errors(text: str) -> list[tuple[int, int, str]]:
    with pytest.raises(TissSyntaxError) as caught:
        parse(text, "t.tiss")
    return [(d.line, d.column, d.message) for d in caught.value.diagnostics]


def test_header_language():
    assert parse("#TISS! Language=Python\n").language == "Python"
    assert parse("#TISS!").language is None


def test_commands():
    nodes = body(
        'RUN "echo \\"hi\\" \\\\ done\\n"\n'
        'READ "a.txt" AS text\n'
        "VAR n = 3\n"
        'PROMPT_AGENT "fix {{text}}" INTO fix\n'
        'SET_BUDGET EXECUTION_TIME = "5m"\n'
        "SET_BUDGET API_CALLS = 4\n"
        'LOG "x"\nPAUSE "p"\nREQUEST_REVIEW "r"\n@persona "dev"\n'
    )
    assert [type(n).__name__ for n in nodes] == [
        "Run", "Read", "Var", "PromptAgent", "SetBudget", "SetBudget", "Log", "Pause", "RequestReview", "Directive"
    ]  # fmt: skip
    assert nodes[0].command == 'echo "hi" \\ done\n'
    assert (nodes[1].path, nodes[1].name) == ("a.txt", "text")
    assert nodes[3].into == "fix" and nodes[4].value == "5m" and nodes[5].value == 4
    assert nodes[9] == ast.Directive(nodes[9].span, "persona", "dev")


def test_retrieve():
    plain, top = body(
        'RETRIEVE "how is {{thing}} done" INTO context\nSTEP "s" {\n    RETRIEVE "q" INTO hits TOP 3\n}\n'
    )
    assert plain == ast.Retrieve(ast.Span(2, 1, 2, 46), "how is {{thing}} done", "context", None)
    assert top.body[0] == ast.Retrieve(ast.Span(4, 5, 4, 33), "q", "hits", 3)
    assert json.loads(json.dumps(top.body[0].to_dict())) == {
        "type": "Retrieve", "span": [4, 5, 4, 33], "query": "q", "into": "hits", "top": 3
    }  # fmt: skip
    assert plain.to_dict(spans=False)["top"] is None
    assert format_script(ast.Script(NO_SPAN, None, (plain, top))) == (
        '#TISS!\nRETRIEVE "how is {{thing}} done" INTO context\nSTEP "s" {\n    RETRIEVE "q" INTO hits TOP 3\n}\n'
    )
    assert errors('#TISS!\nRETRIEVE "q" INTO c TOP x\n') == [(2, 25, "unexpected 'x'; expected an integer")]
    assert body('VAR TOP = 1\nRETRIEVE "q" INTO TOP')[1].into == "TOP"  # TOP stays usable as a name


def test_blocks_and_spans():
    nodes = body(
        'TASK "t"\n'
        'SETUP { RUN "a" }\n'
        'STEP "s" {\n    RUN "b"\n}\n'
        'IF x == 1 THEN { LOG "y" } ELSE { LOG "n" }\n'
        'IF TRUE THEN {\n    LOG "y"\n}\nELSE {\n    LOG "n"\n}\n'
        'TRY { RUN "c" }\nCATCH { LOG "e" }\n'
        'PARALLEL {\n  RUN "1"\n  RUN "2"\n}\n'
        'CHOOSE {\n  OPTION "a" { RUN "a" }\n  OPTION "b" { RUN "b" }\n}\n'
        'ESTIMATE_COST { RUN "d" }\n'
        'TASK "wrapped" {\n  LOG "inside"\n}\n'
    )
    task, setup, step, if1, if2, try_, par, choose, est, wrapped = nodes
    assert task.body is None and wrapped.body == (ast.Log(wrapped.body[0].span, "inside"),)
    assert setup.title is None and setup.body[0].command == "a"
    assert step.span == ast.Span(4, 1, 6, 2) and step.body[0].span == ast.Span(5, 5, 5, 12)
    assert if1.orelse[0].text == "n" and if2.orelse[0].text == "n"
    assert if2.span.line == 8 and if2.span.end_line == 13  # the ELSE on its own line joins its IF
    assert try_.catch[0].text == "e"
    assert [r.command for r in par.body] == ["1", "2"]
    assert [o.label for o in choose.options] == ["a", "b"]
    assert est.body[0].command == "d"


def test_expressions():
    (a,) = body('ASSERT NOT LAST_RUN.TIMED_OUT AND (x CONTAINS "a" OR y NOT CONTAINS "b") AND z IS_EMPTY\n')
    cond = a.condition
    assert cond.op == "AND" and cond.right == ast.IsEmpty(cond.right.span, ast.VarRef(cond.right.operand.span, "z"))
    left = cond.left
    assert isinstance(left.left, ast.Not) and left.left.operand.field == "TIMED_OUT"
    assert left.right.op == "OR" and left.right.right.op == "NOT CONTAINS"
    (b,) = body('ASSERT FILE "out.txt" EXISTS OR LAST_RUN.STDOUT MATCHES "^ok$" OR 1.5 <= 2\n')
    assert b.condition.left.left == ast.FileExists(b.condition.left.left.span, "out.txt")
    assert b.condition.right.op == "<=" and b.condition.right.left.value == 1.5
    (c,) = body("ASSERT LAST_PROMPT.MEAN_ENTROPY < 2.5 AND LAST_PROMPT.MAX_ENTROPY <= 4\n")
    assert c.condition.left.left == ast.LastPrompt(c.condition.left.left.span, "MEAN_ENTROPY")
    assert c.condition.right.left.field == "MAX_ENTROPY"


def test_heredoc_fidelity():
    text = 'def f():\n\n    return "}"  # a comment, kept\n\t\tindented with tabs   \n\n'
    script = '#TISS!\nSTEP "w" {\n    WRITE "f.py" <<PYTHON\n' + text + 'PYTHON\n    RUN "x"\n}\n'
    (step,) = parse(script).body
    write, run = step.body
    assert write.content == text and write.delimiter == "PYTHON" and write.interpolate
    assert run.span.line == 10  # lines after a heredoc keep their numbers
    (raw,) = body("WRITE \"t\" <<'EOF'\n{{not_a_var}}\nEOF\n")
    assert raw.content == "{{not_a_var}}\n" and not raw.interpolate
    (empty,) = body('WRITE "e" <<EOF\nEOF\n')
    assert empty.content == ""


@pytest.mark.parametrize(
    "text, expected",
    [
        ('RUN "a"\nRUNN "b"\n', [(3, 1, "unknown keyword 'RUNN'")]),
        ("ASSERT LAST_RUN.EXIT == 0\n", [(2, 17, "unexpected 'EXIT'")]),
        ("ASSERT LAST_PROMPT.STDOUT == 0\n", [(2, 20, "expected MEAN_ENTROPY or MAX_ENTROPY")]),
        ('LOG "open\n', [(2, 5, "unterminated string")]),
        ('LOG "bad \\q"\n', [(2, 10, "unknown escape \\q")]),
        ('STEP "a" {\n  RUN "x"\n', [(2, 10, "never closed")]),
        ('ELSE { LOG "x" }\n', [(2, 1, "ELSE without IF")]),
        ('TRY { RUN "x" }\n', [(2, 1, "TRY without CATCH")]),
        ("SET_BUDGET MONEY = 1\n", [(2, 12, "unknown budget MONEY")]),
        ('WRITE "f" <<EOF\nbody\n', [(2, 11, "heredoc <<EOF is never closed")]),
        ('ASSERT x MATCHES "("\n', [(2, 18, "invalid regular expression")]),
        ('CHOOSE {\n  RUN "x"\n}\n', [(3, 3, "expected '}', OPTION")]),
    ],
)
def test_each_error_has_its_position(text, expected):
    found = errors("#TISS!\n" + text)
    assert [(line, col) for line, col, _ in found] == [(line, col) for line, col, _ in expected]
    for (_, _, message), (_, _, part) in zip(found, expected, strict=True):
        assert part in message


@pytest.mark.parametrize(
    "text, position, message",
    [
        ('RUNN "x"', (2, 1), "unknown keyword 'RUNN' (did you mean RUN?)"),
        ("ASERT 1 == 1", (2, 1), "unknown keyword 'ASERT' (did you mean ASSERT?)"),
        ('run "x"', (2, 1), "unknown keyword 'run' (keywords are in capitals: did you mean RUN?)"),
        ("IF LAST_RUN.EXIT_CODE = 0 THEN {\n}", (2, 23), "'=' does not compare: did you mean '=='?"),
        ("ASSERT LAST_RUN.EXIT_CODE = 0", (2, 27), "did you mean '=='?"),
        ("VAR ok = LAST_RUN.EXIT_CODE = 0", (2, 29), "did you mean '=='?"),
        ("ASSERT LAST_RUN.STDOUT CONTAINS", (2, 24), "CONTAINS needs a value on its right"),
        ('ASSERT LAST_RUN.STDOUT CONTAINS\nLOG "x"', (2, 24), "CONTAINS needs a value on its right"),
        ("ASSERT (LAST_RUN.STDOUT MATCHES)", (2, 25), "MATCHES needs a value on its right, not ')'"),
        ("ASSERT LAST_RUN.EXIT_CODE ==", (2, 27), "'==' needs a value on its right"),
        ("ASSERT LAST_RUN.EXIT_CODE == 0 AND", (2, 32), "AND needs a value on its right"),
        ("ASSERT NOT", (2, 8), "NOT needs a condition after it"),
        ('ASSERT CONTAINS "x"', (2, 8), "CONTAINS needs a value on its left"),
        ("VAR x =", (2, 7), "'=' needs a value on its right"),
        ("RUN", (2, 4), 'RUN needs a "string" after it'),
        ('READ "f" AS', (2, 12), "AS needs a name after it"),
        ('ASSERT 1 CONTAIN "y"', (2, 10), "unexpected 'CONTAIN'; expected"),
        ('ASSERT 1 CONTAIN "y"', (2, 10), "(did you mean CONTAINS?)"),
        ("ASSERT LAST_RUN.STDOT == 0", (2, 17), "(did you mean STDOUT?)"),
        ("IF 1 == 1 {\n}", (2, 11), "IF needs THEN before its block"),
    ],
)
def test_syntax_errors_suggest_the_fix(text, position, message):
    """The nearest keyword or field for a misspelt one, `==` for `=`, and the operator that lacks an operand."""
    found = errors("#TISS!\n" + text + "\n")
    assert len(found) == 1, found
    (line, column, said) = found[0]
    assert (line, column) == position and message in said, found[0]


def test_every_error_is_reported_not_just_the_first():
    found = errors('RUN "no header"\nSTEP "a" {\n  RUNN "x"\n  LOG "ok"\n  ASSERT == 1\n}\nLOG "bad \\z"\n')
    assert [(line, col) for line, col, _ in found] == [(1, 1), (3, 3), (5, 10), (7, 10)]


def test_rendered_error_has_source_line_and_caret():
    with pytest.raises(TissSyntaxError) as caught:
        parse('#TISS!\nLOG "x"\n    RUNN "y"\n', "s.tiss")
    assert str(caught.value).splitlines() == [
        "s.tiss:3:5: unknown keyword 'RUNN' (did you mean RUN?)",
        '        RUNN "y"',
        "        ^",
    ]


def test_semantic_checks():
    script = parse(
        '#TISS!\nRUN "echo {{ghost}}"\nSTEP "a" {\n  STEP "b" { LOG "x" }\n}\n@mood "happy"\n'
        'ESTIMATE_COST { PROMPT_AGENT "p" INTO later }\nLOG "{{later}}"\nPARALLEL { LOG "no" }\n'
        'SET_BUDGET EXECUTION_TIME = "soon"\nVAR ok = 1\nASSERT ok == 1 AND given == 2\n'
        'RETRIEVE "{{nowhere}}" INTO found TOP 0\nLOG "{{found}}"\nRETRIEVE "q" INTO more TOP 1001\n'
    )
    found = [(d.line, d.column, d.message.split(" (")[0]) for d in check(script, given=["given"])]
    assert found == [
        (2, 1, "undefined variable 'ghost'"),
        (4, 3, "STEP inside a STEP: steps do not nest"),
        (6, 1, "unknown directive @mood"),
        (8, 1, "undefined variable 'later'"),  # ESTIMATE_COST defines nothing: it does not run
        (9, 12, "PARALLEL holds RUN commands only"),
        (10, 1, 'EXECUTION_TIME wants a duration such as "90s", "5m" or "1h", not \'soon\''),
        (13, 1, "undefined variable 'nowhere'"),
        (13, 1, "RETRIEVE ... TOP wants 1 to 1000 chunks, not 0"),  # and `found` is defined from here on
        (15, 1, "RETRIEVE ... TOP wants 1 to 1000 chunks, not 1001"),
    ]


def test_the_top_limit_is_the_knowledge_bases():
    from tisslm.agent.checks import MAX_TOP
    from tisslm.kb.index import MAX_K

    assert MAX_TOP == MAX_K


def test_durations():
    assert [parse_duration(t) for t in ("90", "30s", "5m", "1.5h", "250ms", "soon")] == [90, 30, 300, 5400, 0.25, None]


def test_to_dict_is_json():
    script = parse('#TISS!\nSTEP "a" { RUN "x" }\n')
    data = json.loads(json.dumps(script.to_dict()))
    assert data["body"][0] == {
        "type": "Step",
        "span": [2, 1, 2, 21],
        "title": "a",
        "body": [{"type": "Run", "span": [2, 12, 2, 19], "command": "x"}],
    }


# ---- round trip: format(AST) parses back to the same AST ----------------------------------------

NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from('"\\\n\t{}#'), max_size=12
)
LINE = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.sampled_from('"\\\t{}#<'), max_size=20
)


def _node(cls, *args):
    return cls(NO_SPAN, *args)


atoms = st.one_of(
    TEXT.map(lambda t: _node(ast.Literal, t)),
    st.integers(-(10**6), 10**6).map(lambda n: _node(ast.Literal, n)),
    st.integers(0, 10**6).map(lambda n: _node(ast.Literal, n / 100)),
    st.booleans().map(lambda b: _node(ast.Literal, b)),
    NAMES.map(lambda n: _node(ast.VarRef, n)),
    st.sampled_from(["EXIT_CODE", "STDOUT", "STDERR", "DURATION", "TIMED_OUT"]).map(lambda f: _node(ast.LastRun, f)),
    st.sampled_from(["MEAN_ENTROPY", "MAX_ENTROPY"]).map(lambda f: _node(ast.LastPrompt, f)),
    TEXT.map(lambda t: _node(ast.FileExists, t)),
)
OPS = ["AND", "OR", "CONTAINS", "NOT CONTAINS", "MATCHES", "==", "!=", "<", "<=", ">", ">="]


def _valid_regex_operand(op: str, right: ast.Expr) -> bool:
    """The parser refuses a literal pattern that does not compile (tested above), so a valid AST's
    MATCHES has none on its right: the round trip is drawn from valid ASTs only."""
    if op != "MATCHES" or not isinstance(right, ast.Literal) or not isinstance(right.value, str):
        return True
    if "{{" in right.value:  # interpolated when the script runs: checked then
        return True
    try:
        re.compile(right.value)
    except re.error:
        return False
    return True


exprs = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.tuples(st.sampled_from(OPS), inner, inner)
        .filter(lambda t: _valid_regex_operand(t[0], t[2]))
        .map(lambda t: _node(ast.Binary, *t)),
        inner.map(lambda e: _node(ast.Not, e)),
        inner.map(lambda e: _node(ast.IsEmpty, e)),
    ),
    max_leaves=6,
)


@st.composite
def heredocs(draw):
    delimiter = draw(st.sampled_from(["EOF", "PYTHON", "SH"]))
    lines = draw(st.lists(LINE.filter(lambda s: s.strip() != delimiter and "\n" not in s), max_size=4))
    return _node(ast.Write, draw(TEXT), "".join(line + "\n" for line in lines), delimiter, draw(st.booleans()))


commands = st.one_of(
    TEXT.map(lambda t: _node(ast.Run, t)),
    heredocs(),
    st.tuples(TEXT, NAMES).map(lambda t: _node(ast.Read, *t)),
    exprs.map(lambda e: _node(ast.Assert, e)),
    st.tuples(NAMES, exprs).map(lambda t: _node(ast.Var, *t)),
    st.tuples(TEXT, NAMES).map(lambda t: _node(ast.PromptAgent, *t)),
    st.tuples(TEXT, NAMES, st.none() | st.integers(-5, 2000)).map(lambda t: _node(ast.Retrieve, *t)),
    st.tuples(st.sampled_from(["EXECUTION_TIME", "API_CALLS"]), TEXT | st.integers(0, 99)).map(
        lambda t: _node(ast.SetBudget, *t)
    ),
    TEXT.map(lambda t: _node(ast.Log, t)),
    TEXT.map(lambda t: _node(ast.Pause, t)),
    TEXT.map(lambda t: _node(ast.RequestReview, t)),
    st.tuples(NAMES, TEXT).map(lambda t: _node(ast.Directive, *t)),
)


def _blocks(inner):
    bodies = st.lists(inner, max_size=3).map(tuple)
    return st.one_of(
        st.tuples(TEXT, bodies | st.none()).map(lambda t: _node(ast.Task, *t)),
        st.tuples(TEXT | st.none(), bodies).map(lambda t: _node(ast.Setup, *t)),
        st.tuples(TEXT, bodies).map(lambda t: _node(ast.Step, *t)),
        st.tuples(exprs, bodies, bodies | st.none()).map(lambda t: _node(ast.If, *t)),
        st.tuples(bodies, bodies).map(lambda t: _node(ast.Try, *t)),
        bodies.map(lambda b: _node(ast.Parallel, b)),
        bodies.map(lambda b: _node(ast.EstimateCost, b)),
        st.lists(st.tuples(TEXT, bodies).map(lambda t: _node(ast.Option, *t)), max_size=3).map(
            lambda options: _node(ast.Choose, tuple(options))
        ),
    )


statements = st.recursive(commands, _blocks, max_leaves=8)
scripts = st.tuples(st.sampled_from([None, "Python", "Shell"]), st.lists(statements, max_size=5).map(tuple))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts)
def test_format_then_parse_gives_the_same_ast(generated):
    script = ast.Script(NO_SPAN, *generated)
    text = format_script(script)
    reparsed = parse(text)
    assert reparsed.to_dict(spans=False) == script.to_dict(spans=False), text
    assert format_script(reparsed) == text


# ---- the saved parse tables ----------------------------------------------------------------------


def test_the_shipped_parse_tables_are_those_of_the_grammar():
    """grammar.lark changed without `python tools/tisslang_tables.py`: the parser still works (it
    builds the tables) but every start pays 50 ms again; this fails until the file is rewritten."""
    from tisslm.agent import parser

    saved = json.loads(parser.PARSE_TABLES.read_text())
    assert saved["key"] == json.loads(json.dumps(parser._tables_key(parser.GRAMMAR.read_text())))


def test_the_parser_loads_the_saved_tables_and_parses_as_the_built_one(monkeypatch):
    from lark import Lark

    from tisslm.agent import parser

    scripts = sorted((REPO / "examples").rglob("*.tiss")) + sorted((REPO / "tests").rglob("*.tiss"))
    assert len(scripts) >= 5
    built = [parser.parse_file(path) for path in scripts]  # whichever way the cached parser was made
    bad = '#TISS!\nRUNN "x"\nVAR a = \nIF {{a}} = 0 {\n}\n'
    with pytest.raises(TissSyntaxError) as built_error:
        parse(bad, "t.tiss")

    def no_building(*args, **kwargs):
        raise AssertionError("the parser computed its tables instead of loading them")

    monkeypatch.setattr(Lark, "__init__", no_building)  # Lark.load makes its instance without __init__
    parser._lark.cache_clear()
    try:
        assert [parser.parse_file(path) for path in scripts] == built
        with pytest.raises(TissSyntaxError) as loaded_error:
            parse(bad, "t.tiss")
        assert loaded_error.value.render() == built_error.value.render()
    finally:
        parser._lark.cache_clear()


def test_tables_of_another_grammar_are_ignored_for_a_built_parser(monkeypatch, tmp_path):
    from tisslm.agent import parser

    expected = [parser.parse_file(path) for path in sorted((REPO / "examples").rglob("*.tiss"))]
    stale = json.loads(parser.PARSE_TABLES.read_text())
    stale["key"]["grammar_sha256"] = "0" * 64
    built = []

    class CountingLark(parser.Lark):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(parser, "Lark", CountingLark)
    for name, text in (("stale.json", json.dumps(stale)), ("corrupt.json", '{"key": '), ("missing.json", None)):
        if text is not None:
            (tmp_path / name).write_text(text)
        monkeypatch.setattr(parser, "PARSE_TABLES", tmp_path / name)
        parser._lark.cache_clear()
        try:
            assert [parser.parse_file(path) for path in sorted((REPO / "examples").rglob("*.tiss"))] == expected, name
            assert len(built) == 1, name
            built.clear()
        finally:
            parser._lark.cache_clear()
