"""Facts about SQL text, from PostgreSQL's own parser (pglast wraps libpg_query).

Policy must not judge SQL by its keywords: `select lo_unlink(16403)` reads like
a query and deletes a large object. This module parses the text exactly as a
PostgreSQL server would and reports what the statements would do, as plain
JSON for the policy input (docs/policy-input.md, "tool.facts"):

    {
      "format": "sql",
      "parsed": true,               false when the parser refused the text
      "error": null,                the parser's message when parsed is false
      "statements": ["select"],     top-level statement kinds, in order
      "commands": ["select"],       every statement kind anywhere (inside CTEs,
                                    EXPLAIN, ...), sorted, no repeats
      "tables_read": ["orders"],    relations read (CTE names included)
      "tables_written": [],         relations a statement writes, creates or
                                    alters (INSERT/UPDATE/DELETE/MERGE targets,
                                    SELECT INTO, COPY FROM, DDL)
      "functions": ["count"],       every function called, as the parser
                                    resolved its name: schema-qualified when
                                    written so ("pg_catalog.lower"), with
                                    quoted parts kept quoted ('"LO_UNLINK"')
      "operators": ["=", "~~"],     every operator used (operators are
                                    functions too), as the parser names it
                                    ("!=" is "<>", LIKE is "~~"), schema-
                                    qualified when written OPERATOR(s.op)
      "row_locks": false            SELECT ... FOR UPDATE/SHARE
    }

Statement kinds are the parser's node names in snake case without "Stmt"
(`DeleteStmt` -> "delete", `CreateTableAsStmt` -> "create_table_as"), except
`VariableSetStmt` -> "set", `VariableShowStmt` -> "show", and a SELECT with an
INTO clause -> "select_into". When parsed is false every list is empty: the
policy must treat that as "unknown", never as "reads nothing".

Limits (what the syntax cannot tell): which function an unqualified name
resolves to depends on the server's search_path (pg_catalog comes first unless
the path names it later); user-defined operators and functional notation on
composite values (`row.func`) run a function the parse tree does not show
as a call. The database role the tool uses is the second line of defence.
"""

from __future__ import annotations

import re
from typing import Any

import pglast
from pglast import ast

FORMAT = "sql"

_KIND_OVERRIDES = {"VariableSetStmt": "set", "VariableShowStmt": "show"}
# Fields of a statement node that name the relation the statement acts on.
_TARGET_FIELDS = ("relation", "relations", "rel")
_PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*")


def sql_facts(text: str) -> dict[str, Any]:
    """Facts about `text` (one or more SQL statements); never raises."""
    if "\x00" in text:
        # libpg_query reads a C string: it would stop at the NUL and see less
        # than the server might be sent.
        return unparsed("the text contains U+0000")
    try:
        statements = pglast.parse_sql(text)
    except pglast.parser.ParseError as exc:
        return unparsed(str(exc))
    except (RecursionError, MemoryError, ValueError) as exc:
        return unparsed(f"the parser gave up ({type(exc).__name__})")
    if not statements:
        return unparsed("no statement")

    commands: set[str] = set()
    read: set[str] = set()
    written: set[str] = set()
    functions: set[str] = set()
    operators: set[str] = set()
    row_locks = False
    stack: list[tuple[Any, Any, str]] = [(raw.stmt, None, "") for raw in statements]
    while stack:
        node, parent, field = stack.pop()
        if isinstance(node, (list, tuple)):
            stack.extend((child, parent, field) for child in node)
            continue
        if not isinstance(node, ast.Node):
            continue
        if _is_statement(node):
            commands.add(_kind(node))
        if isinstance(node, ast.SelectStmt) and node.lockingClause:
            row_locks = True
        if isinstance(node, ast.RangeVar):
            name = _qualified(node.catalogname, node.schemaname, node.relname)
            (written if _is_target(parent, field) else read).add(name)
        elif isinstance(node, ast.FuncCall):
            functions.add(_qualified(*(part.sval for part in node.funcname)))
        elif isinstance(node, ast.A_Expr) and node.name:
            *schema, symbol = (part.sval for part in node.name)
            operators.add(".".join([*(_quote(part) for part in schema), symbol]))
        for slot in type(node).__slots__:
            child = getattr(node, slot, None)
            if isinstance(child, (ast.Node, list, tuple)):
                stack.append((child, node, slot))
    return {
        "format": FORMAT,
        "parsed": True,
        "error": None,
        "statements": [_kind(raw.stmt) for raw in statements],
        "commands": sorted(commands),
        "tables_read": sorted(read - written),
        "tables_written": sorted(written),
        "functions": sorted(functions),
        "operators": sorted(operators),
        "row_locks": row_locks,
    }


def unparsed(error: str) -> dict[str, Any]:
    """The facts of text that was not parsed: `error` says why."""
    return {
        "format": FORMAT,
        "parsed": False,
        "error": error,
        "statements": [],
        "commands": [],
        "tables_read": [],
        "tables_written": [],
        "functions": [],
        "operators": [],
        "row_locks": False,
    }


def _is_statement(node: ast.Node) -> bool:
    return type(node).__name__.endswith("Stmt") and not isinstance(node, ast.RawStmt)


def _kind(node: ast.Node) -> str:
    name = type(node).__name__
    if isinstance(node, ast.SelectStmt) and node.intoClause is not None:
        return "select_into"
    if name in _KIND_OVERRIDES:
        return _KIND_OVERRIDES[name]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("Stmt")).lower()


def _is_target(parent: Any, field: str) -> bool:
    """Whether a relation under parent.field is written (or created, altered, locked)."""
    if isinstance(parent, ast.IntoClause):
        return True
    if parent is None or not _is_statement(parent) or field not in _TARGET_FIELDS:
        return False
    if isinstance(parent, ast.CopyStmt):
        return bool(parent.is_from)  # COPY t TO ... reads t
    return not isinstance(parent, (ast.SelectStmt, ast.ExplainStmt))


def _qualified(*parts: str | None) -> str:
    """A dotted name as PostgreSQL would print it: parts that are not plain
    lower-case identifiers in double quotes, so `"a.b"` never reads as `a.b`."""
    return ".".join(_quote(part) for part in parts if part)


def _quote(part: str) -> str:
    if _PLAIN_IDENTIFIER.fullmatch(part):
        return part
    return '"' + part.replace('"', '""') + '"'
