"""Give the widget models saved in executed notebooks ids that do not change between runs.

    python scripts/stable_widget_ids.py chapters/04_lab.ipynb [more.ipynb …]

Every execution creates ipywidgets models with fresh random ids, and a notebook stores them
twice: in each widget output (``model_id``) and in the widget state in the notebook's metadata,
where every model refers to its children as ``IPY_MODEL_<id>``. Re-running a chapter therefore
rewrites thousands of lines that say nothing new. This renames each model to an id derived from
the notebook's name and the model's place in the widget graph: first the models displayed by
the cells, in cell order, then everything they refer to, breadth first, then any model nothing
refers to, ordered by its content. Running it twice changes nothing.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import nbformat

STATE_MIME = "application/vnd.jupyter.widget-state+json"
VIEW_MIME = "application/vnd.jupyter.widget-view+json"
REF = re.compile(r"IPY_MODEL_([0-9a-f]{32})")


def _displayed(nb: dict[str, Any]) -> list[str]:
    ids = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(VIEW_MIME)
            if view and "model_id" in view:
                ids.append(view["model_id"])
    return ids


def stable_order(nb: dict[str, Any]) -> list[str]:
    """Every model id of the notebook's widget state, in an order that does not depend on the
    ids themselves."""
    state = nb.get("metadata", {}).get("widgets", {}).get(STATE_MIME, {}).get("state", {})
    order: list[str] = []
    seen: set[str] = set()
    todo = deque(m for m in _displayed(nb) if m in state)
    while todo:
        mid = todo.popleft()
        if mid in seen:
            continue
        seen.add(mid)
        order.append(mid)
        text = json.dumps(state[mid], sort_keys=True)
        todo.extend(m for m in REF.findall(text) if m in state and m not in seen)

    def content(mid: str) -> str:  # a model's state with every id in it masked
        return REF.sub("IPY_MODEL_?", json.dumps(state[mid], sort_keys=True))

    order += sorted((m for m in state if m not in seen), key=content)
    return order


def stabilise(path: Path) -> bool:
    """Rename the widget ids in ``path``; True when the file changed."""
    before = path.read_text(encoding="utf-8")
    nb = json.loads(before)
    names = {old: uuid.uuid5(uuid.NAMESPACE_URL, f"deliverylab:{path.stem}:{i}").hex
             for i, old in enumerate(stable_order(nb))}
    if not names:
        return False
    # Two passes through placeholders, so a new id can never collide with an old one.
    after = before
    for i, old in enumerate(names):
        after = after.replace(old, f"\0{i}\0")
    for i, new in enumerate(names.values()):
        after = after.replace(f"\0{i}\0", new)
    # Written back the way Jupyter writes notebooks (keys sorted), so the renamed models also
    # sit in a stable order in the metadata.
    after = nbformat.writes(nbformat.reads(after, as_version=nbformat.NO_CONVERT)) + "\n"
    if after == before:
        return False
    path.write_text(after, encoding="utf-8")
    return True


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for arg in argv:
        changed = stabilise(Path(arg))
        print(f"{arg}: {'widget ids renamed' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
