"""TissLang: the agent's workflow language (grammar, parser, engine, sandbox).

grammar.lark  the whole grammar (lark, LALR)      parser.py    source -> AST, every error; AST -> source
ast.py        frozen dataclasses with spans       checks.py    undefined variables, nesting, directives
interpreter.py runs a script; TRY/CATCH, budgets  sandbox.py   RUN in bubblewrap + rlimits + timeouts
workspace.py  READ/WRITE confined to a directory  adapter.py   PROMPT_AGENT: local model dir or HTTP
review.py     PAUSE / REQUEST_REVIEW / CHOOSE     audit.py     the JSONL audit log of a run
commands.py   `tisslm tiss check | plan | run`    docs/tisslang.md: the language, with examples
"""
