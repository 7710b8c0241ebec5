"""Mutation testing of the model solutions: does the grader notice a solution made wrong?

A grader that passes the model solution proves little; one that fails every small break of
it proves that its fault schedule and its checker look where the solution works. This module
breaks each solution mechanically, the way a tired engineer would, and grades each broken
copy (a *mutant*). A mutant the grader fails is *killed*; one it passes *survives*, and is
either equivalent to the solution (the change does not matter, and the survivor's
description says why in the tests) or a hole in the grader.

The mutation operators, each applied at every place it fits, one place per mutant:

* ``swap``: two adjacent statements of one block change places;
* ``drop-where``: a ``WHERE`` clause of an SQL string literal becomes ``WHERE true`` (the
  clause dropped, in a form SQLite still parses before an ``ON CONFLICT``);
* ``unwrap``: a ``with`` block (``with transaction(conn):``, ``with ops.transaction():``,
  ``with conn:``) is replaced by its body, so its statements commit on their own;
* ``flip``: a comparison is negated (``==`` and ``!=``, ``<`` and ``>=``, ``is`` and
  ``is not``, ``in`` and ``not in``, ...);
* ``delete-call``: a statement that is only a call is deleted (``pass`` takes its place);
* ``drop-kwarg``: a keyword argument is left out of a call (an idempotency key, a timeout);
* ``off-by-one``: an integer constant ``n`` becomes ``n + 1``, then ``n - 1``.

Each mutant has a stable id, ``"<operator> L<line>[.<k>]"``, with the line counted from the
solution's ``def`` (line 1) so that code above it can move without renaming the mutants, and a
description quoting the code it changed. A mutant is compiled with the solution's own module
globals (and closure values) and its source is registered with :mod:`linecache`, so the
grader can read it back with :func:`inspect.getsource` like a function defined in a
notebook cell.
"""

from __future__ import annotations

import ast
import copy
import inspect
import io
import itertools
import linecache
import multiprocessing
import re
import textwrap
import time
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..engine.errors import InvalidInput, check_int

OPERATORS = ("swap", "drop-where", "unwrap", "flip", "delete-call", "drop-kwarg", "off-by-one")

_FLIP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt,
    ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In,
}
# A WHERE clause ends where the next clause of its statement begins (at its own depth of
# parentheses), at the parenthesis that closes its subquery, or at the end of the string.
_WHERE = re.compile(r"\s+WHERE\s", re.IGNORECASE)
_NEXT = re.compile(r"\s+(?:GROUP\s+BY|ORDER\s+BY|ON\s+CONFLICT|RETURNING|LIMIT|HAVING|UNION"
                   r"|DO\s+UPDATE|DO\s+NOTHING)\b", re.IGNORECASE)


def where_clauses(sql: str) -> list[tuple[int, int]]:
    """The (start, end) spans of every WHERE clause in ``sql``, leading blanks included."""
    spans = []
    for m in _WHERE.finditer(sql):
        depth, i = 0, m.end()
        while i < len(sql):
            ch = sql[i]
            if ch == "(":
                depth += 1
            elif ch == ")":
                if depth == 0:
                    break
                depth -= 1
            elif ch == "'":
                i = sql.find("'", i + 1)
                if i < 0:
                    i = len(sql)
                    break
            elif depth == 0 and _NEXT.match(sql, i):
                break
            i += 1
        spans.append((m.start(), i))
    return spans


_SNIPPET = 60


@dataclass(frozen=True)
class Mutant:
    """One broken copy of a solution: ``id`` is stable across edits above the function,
    ``description`` quotes the change, ``source`` is the mutated function's source."""

    id: str
    operator: str
    description: str
    source: str


@dataclass(frozen=True)
class Outcome:
    """What the grader said about one mutant: ``killed`` on seed ``seed`` (None: survived
    every seed), with the first line of its reason; ``error`` when it could not be built or
    graded at all (a crash of the grader counts as killed, and is reported)."""

    mutant: Mutant
    killed: bool
    seed: int | None
    reason: str
    seconds: float


def solution_source(fn: Callable[..., Any]) -> str:
    """The dedented source of ``fn`` (a function defined with ``def``)."""
    if not inspect.isfunction(fn):
        raise InvalidInput("solution", fn, "a function defined with def")
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise InvalidInput("solution", fn, "a function whose source can be read") from None
    tree = ast.parse(src)
    if not tree.body or not isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef):
        raise InvalidInput("solution", fn, "a function defined with def")
    return src


def _snippet(node: ast.AST) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= _SNIPPET else text[:_SNIPPET - 1] + "…"


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
        and isinstance(stmt.value.value, str)


def _bodies(tree: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    """Every statement list in ``tree``: (owner node, field name)."""
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield node, name
        if isinstance(node, ast.Try | ast.TryStar):
            for h in node.handlers:
                yield h, "body"


class _Site:
    """One place an operator applies, as a function that edits a fresh copy of the tree."""

    def __init__(self, operator: str, line: int, description: str,
                 edit: Callable[[ast.Module], None]) -> None:
        self.operator, self.line, self.description, self.edit = operator, line, description, edit


def _path_to(tree: ast.AST, target: ast.AST) -> list[tuple[str, int | None]]:
    """The field path from ``tree`` to ``target``, to find the same node in a deep copy."""
    def walk(node: ast.AST, path: list[tuple[str, int | None]]):
        if node is target:
            return path
        for name, value in ast.iter_fields(node):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, ast.AST):
                        found = walk(item, [*path, (name, i)])
                        if found is not None:
                            return found
            elif isinstance(value, ast.AST):
                found = walk(value, [*path, (name, None)])
                if found is not None:
                    return found
        return None

    found = walk(tree, [])
    assert found is not None
    return found


def _follow(tree: ast.AST, path: list[tuple[str, int | None]]) -> Any:
    """The node at ``path`` in ``tree`` (of the type the path was taken to)."""
    node = tree
    for name, i in path:
        node = getattr(node, name) if i is None else getattr(node, name)[i]
    return node


def _sites(tree: ast.Module) -> list[_Site]:
    fn = tree.body[0]
    sites: list[_Site] = []

    def at(node: ast.AST) -> int:
        return getattr(node, "lineno", fn.lineno) - fn.lineno + 1

    # swap and delete-call, per block
    for owner, name in _bodies(fn):
        block = getattr(owner, name)
        path = _path_to(tree, owner)
        stmts = [(i, s) for i, s in enumerate(block) if not _is_docstring(s)]
        for (i, a), (j, b) in itertools.pairwise(stmts):
            if j != i + 1:
                continue

            def swap(t: ast.Module, path=path, name=name, i=i) -> None:
                blk = getattr(_follow(t, path), name)
                blk[i], blk[i + 1] = blk[i + 1], blk[i]

            sites.append(_Site("swap", at(a), f"swap `{_snippet(a)}` with `{_snippet(b)}`",
                               swap))
        for i, s in stmts:
            if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
                def delete(t: ast.Module, path=path, name=name, i=i) -> None:
                    getattr(_follow(t, path), name)[i] = ast.Pass()

                sites.append(_Site("delete-call", at(s), f"delete `{_snippet(s)}`", delete))
    for node in ast.walk(fn):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.match(
                r"\s*(SELECT|UPDATE|DELETE|INSERT|WITH)\b", node.value, re.IGNORECASE):
            path = _path_to(tree, node)
            for start, end in where_clauses(node.value):
                def drop(t: ast.Module, path=path, start=start, end=end) -> None:
                    n = _follow(t, path)
                    n.value = n.value[:start] + " WHERE true" + n.value[end:]

                clause = " ".join(node.value[start:end].split())
                sites.append(_Site("drop-where", at(node),
                                   f"drop `{clause[:_SNIPPET]}` from the SQL", drop))
        elif isinstance(node, ast.With | ast.AsyncWith):
            path = _path_to(tree, node)

            def unwrap(t: ast.Module, path=path) -> None:
                w = _follow(t, path)
                parent_path, (field, i) = path[:-1], path[-1]
                blk = getattr(_follow(t, parent_path), field)
                blk[i:i + 1] = w.body

            head = ", ".join(_snippet(item) for item in node.items)
            sites.append(_Site("unwrap", at(node), f"remove the `with {head}:` wrapper",
                               unwrap))
        elif isinstance(node, ast.Compare):
            path = _path_to(tree, node)
            for k, op in enumerate(node.ops):
                if type(op) not in _FLIP:
                    continue

                def flip(t: ast.Module, path=path, k=k) -> None:
                    c = _follow(t, path)
                    c.ops[k] = _FLIP[type(c.ops[k])]()

                after = copy.deepcopy(node)
                after.ops[k] = _FLIP[type(op)]()
                sites.append(_Site("flip", at(node),
                                   f"`{_snippet(node)}` becomes `{_snippet(after)}`", flip))
        elif isinstance(node, ast.Call) and node.keywords:
            path = _path_to(tree, node)
            for k, kw in enumerate(node.keywords):
                if kw.arg is None:
                    continue

                def drop_kw(t: ast.Module, path=path, k=k) -> None:
                    del _follow(t, path).keywords[k]

                sites.append(_Site("drop-kwarg", at(node),
                                   f"leave `{kw.arg}=` out of `{_snippet(node)}`", drop_kw))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            path = _path_to(tree, node)
            for delta in (1, -1):
                def shift(t: ast.Module, path=path, delta=delta) -> None:
                    c = _follow(t, path)
                    c.value = c.value + delta

                sites.append(_Site("off-by-one", at(node),
                                   f"constant {node.value} becomes {node.value + delta}",
                                   shift))
    return sites


def mutants(fn: Callable[..., Any], *, operators: Iterable[str] = OPERATORS) -> list[Mutant]:
    """Every mutant of ``fn``'s source, in source order, each with a stable id."""
    ops = tuple(operators)
    for op in ops:
        if op not in OPERATORS:
            raise InvalidInput("operators", op, "one of " + ", ".join(OPERATORS))
    src = solution_source(fn)
    tree = ast.parse(src)
    assert isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef)  # a solution: a def
    tree.body[0].decorator_list = []
    original = ast.unparse(tree)
    out: list[Mutant] = []
    seen: dict[str, int] = {}
    sites = sorted((s for s in _sites(tree) if s.operator in ops),
                   key=lambda s: (s.line, OPERATORS.index(s.operator)))
    for site in sites:
        t = copy.deepcopy(tree)
        site.edit(t)
        ast.fix_missing_locations(t)
        _fill_empty_blocks(t)
        source = ast.unparse(t)
        if source == original:
            continue
        base = f"{site.operator} L{site.line}"
        n = seen[base] = seen.get(base, 0) + 1
        out.append(Mutant(id=base if n == 1 else f"{base}.{n}", operator=site.operator,
                          description=f"line {site.line}: {site.description}",
                          source=source + "\n"))
    return out


def _fill_empty_blocks(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        for name in ("body", "finalbody"):
            if getattr(node, name, None) == [] and not isinstance(node, ast.Module):
                setattr(node, name, [ast.Pass()])


_counter = itertools.count(1)
MUTANT_MODULE = "deliverylab.course.mutants"  # no such module: see build()


def build(mutant: Mutant, original: Callable[..., Any]) -> Callable[..., Any]:
    """The mutant as a function with ``original``'s globals and closure values; its source
    is in :mod:`linecache`, so ``inspect.getsource`` reads the mutant, not the original."""
    filename = f"<mutant {next(_counter)}: {original.__name__} {mutant.id}>"
    code = compile(mutant.source, filename, "exec")
    linecache.cache[filename] = (len(mutant.source), None,
                                 mutant.source.splitlines(keepends=True), filename)
    namespace = dict(original.__globals__)
    if original.__closure__:
        for name, cell in zip(original.__code__.co_freevars, original.__closure__,
                              strict=True):
            try:
                namespace[name] = cell.cell_contents
            except ValueError:  # an empty cell: the name is unbound in the original too
                pass
    exec(code, namespace)  # noqa: S102 - the mutant of a solution of this package
    fn = namespace[original.__name__]
    # Not the original's module and name: a grader that ships a function to another process
    # by reference must fail loudly here, never grade the original in the mutant's place.
    fn.__module__ = MUTANT_MODULE
    fn.__qualname__ = original.__name__
    return fn


def _grade_seeds(exercise_id: str, fn: Callable[..., Any],
                 seeds: tuple[int, ...]) -> tuple[bool, int | None, str]:
    from .grader import grade

    for seed in seeds:
        verdict = grade(exercise_id, fn, seeds=[seed])
        if not verdict.passed:
            text = str(verdict)
            why = next((ln[5:] for ln in text.splitlines() if ln.startswith("Why: ")),
                       text.splitlines()[0])
            return True, seed, why
    return False, None, ""


def judge_mutant(exercise_id: str, mutant: Mutant, original: Callable[..., Any], *,
                 seeds: Iterable[int] = range(5), time_limit: float = 30.0) -> Outcome:
    """Grade ``mutant`` seed by seed until a seed fails it (killed) or all pass (survived).

    The grading runs in one forked child at a time, so a mutant that loops for ever or ends
    the process cannot take the caller with it. A grading that does not finish within
    ``time_limit`` seconds, or whose process dies, counts as killed with that reason: the
    learner would not see a PASS (the reason says so, for the report)."""
    seeds = tuple(seeds)
    check_int("seeds", len(seeds), minimum=1)
    start = time.perf_counter()
    try:
        fn = build(mutant, original)
    except Exception as exc:  # noqa: BLE001 - a mutant that cannot even be built
        return Outcome(mutant, True, None, f"does not compile: {exc}", 0.0)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def body() -> None:
        try:
            child.send(_grade_seeds(exercise_id, fn, seeds))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            child.send((True, None, f"grader raised {type(exc).__name__}: {exc}"))

    proc = ctx.Process(target=body, daemon=True)
    proc.start()
    child.close()
    try:
        if parent.poll(time_limit):
            killed, seed, why = parent.recv()
        else:
            killed, seed, why = True, None, f"grader timed out after {time_limit:g}s"
    except EOFError:
        killed, seed, why = True, None, "the grading process died without a verdict"
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        parent.close()
    return Outcome(mutant, killed, seed, why, time.perf_counter() - start)


def run(exercise_id: str, *, seeds: Iterable[int] = range(5),
        time_limit: float = 30.0) -> list[Outcome]:
    """Every mutant of exercise ``exercise_id``'s model solution, graded."""
    from .grader import exercise

    ex = exercise(exercise_id)
    seeds = tuple(seeds)
    return [judge_mutant(exercise_id, m, ex.solution, seeds=seeds, time_limit=time_limit)
            for m in mutants(ex.solution)]


# -- how far a solution is from its starter ------------------------------------------------
def _normalized(fn: Callable[..., Any]) -> list[str]:
    """The lines of ``fn``'s body as written, without its docstring, its comments, its blank
    lines and its ``def`` line, each stripped of surrounding blanks: only the code itself
    is compared."""
    src = solution_source(fn)
    tree = ast.parse(src)
    f = tree.body[0]
    assert isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)  # a solution: a def
    skip: set[int] = set(range(1, f.body[0].lineno))  # decorators and the signature
    if _is_docstring(f.body[0]):
        skip |= set(range(f.body[0].lineno, (f.body[0].end_lineno or f.body[0].lineno) + 1))
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return [ln.strip() for n, ln in enumerate(lines, 1) if n not in skip and ln.strip()]


def diff_lines(starter: Callable[..., Any], solution: Callable[..., Any]) -> int:
    """How many lines the solution changes in its starter: per differing block of lines, the
    larger of the lines taken out and put in (so a one-token edit is 1, a new 15-line body
    under a docstring-only starter is 15). Docstrings, comments, blank lines, indentation
    and the signature do not count."""
    import difflib

    a, b = _normalized(starter), _normalized(solution)
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes()
               if tag != "equal")


EDIT_LINES = 5  # a solution this close to its starter is an edit, not a design


def kind(starter: Callable[..., Any] | None, solution: Callable[..., Any]) -> str:
    """``"design"`` or ``"edit"`` (at most :data:`EDIT_LINES` changed lines)."""
    if starter is None:
        return "design"
    return "edit" if diff_lines(starter, solution) <= EDIT_LINES else "design"
