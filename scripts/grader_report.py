"""Print, per registered exercise, what the grader is proven against.

Columns: chapter, exercise, design or edit (``deliverylab.course.mutate.kind``), how many
lines the solution changes in its starter, wrong answers (the exercise's own and the
corpus's in ``tests/course/corpus/chapterN.py``, each function once), correct designs other than
the model (corpus),
and mutants of the model solution killed / total, graded over five seeds each, with the
survivors ``tests/course/test_grader_mutants.py`` lists as equivalent, and the rest (holes).

    python scripts/grader_report.py            # every exercise, as a Markdown table
    python scripts/grader_report.py --chapter 8
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def corpus() -> tuple[dict[str, set], dict[str, set]]:
    """Wrong answers and correct designs per exercise id, from every corpus module."""
    wrong: dict[str, set] = {}
    correct: dict[str, set] = {}
    sys.path.insert(0, str(ROOT / "tests" / "course"))
    for path in sorted((ROOT / "tests" / "course" / "corpus").glob("chapter*.py")):
        module = importlib.import_module(f"corpus.{path.stem}")
        for entry in getattr(module, "WRONG", []):
            wrong.setdefault(entry[0], set()).add(entry[1])
        for entry in getattr(module, "CORRECT", []):
            correct.setdefault(entry[0], set()).add(entry[1])
    return wrong, correct


def equivalent() -> dict[tuple[str, str], str]:
    """The survivors the mutation test lists as equivalent, with their reasons."""
    sys.path.insert(0, str(ROOT / "tests" / "course"))
    return importlib.import_module("test_grader_mutants").EQUIVALENT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chapter", type=int, default=None, help="only this chapter")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per mutant (default 5)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.seeds > 100:
        print(f"--seeds: expected 1 to 100, got {args.seeds}", file=sys.stderr)
        return 2

    from deliverylab.course import EXERCISES, mutate

    wrong, correct = corpus()
    same = equivalent()
    rows = sorted((ex.chapter, ex_id) for ex_id, ex in EXERCISES.items()
                  if args.chapter is None or ex.chapter == args.chapter)
    if not rows:
        print(f"--chapter: no exercise in chapter {args.chapter}", file=sys.stderr)
        return 2
    print("| Ch. | Exercise | Kind | Diff lines | Wrong answers | Correct designs"
          " | Mutants killed | Survivors: equivalent, holes |")
    print("|---:|---|---|---:|---:|---:|---:|---|")
    edits = 0
    for chapter, ex_id in rows:
        ex = EXERCISES[ex_id]
        lines = mutate.diff_lines(ex.starter, ex.solution) if ex.starter else None
        kind = mutate.kind(ex.starter, ex.solution)
        edits += kind == "edit"
        outs = mutate.run(ex_id, seeds=range(args.seeds))
        killed = sum(o.killed and o.seed is not None for o in outs)
        eq = sum(not o.killed and (ex_id, o.mutant.id) in same for o in outs)
        holes = len(outs) - killed - eq
        print(f"| {chapter} | `{ex_id}` | {kind} | {'' if lines is None else lines}"
              f" | {len({w for _, w in ex.wrong} | wrong.get(ex_id, set()))}"
              f" | {len(correct.get(ex_id, set()))}"
              f" | {killed}/{len(outs)} | {eq}, {holes} |", flush=True)
    print(f"\n{edits} of {len(rows)} exercises are edits of {mutate.EDIT_LINES} lines or"
          " fewer. Mutants killed counts a FAIL verdict only; a hole is a survivor not listed"
          " as equivalent, or a grading that hung or raised instead of giving a verdict.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
