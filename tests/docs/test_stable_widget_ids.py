"""scripts/stable_widget_ids.py: a re-executed chapter's widget ids come out the same."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("stable_widget_ids",
                                              ROOT / "scripts" / "stable_widget_ids.py")
stable = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stable)

LAB = ROOT / "chapters" / "04_lab.ipynb"


def model_ids(text: str) -> list[str]:
    return list(json.loads(text)["metadata"]["widgets"][stable.STATE_MIME]["state"])


def test_fresh_random_ids_are_renamed_back_to_the_saved_ones(tmp_path):
    saved = LAB.read_text(encoding="utf-8")
    ids = model_ids(saved)
    assert len(ids) > 20  # the panel is many models
    rerun = saved
    rng = random.Random(3)
    for old in ids:  # what a new execution looks like: every model under a new random id
        rerun = rerun.replace(old, uuid.UUID(int=rng.getrandbits(128)).hex)
    assert rerun != saved
    copy = tmp_path / LAB.name
    copy.write_text(rerun, encoding="utf-8")
    assert stable.stabilise(copy) is True
    assert copy.read_text(encoding="utf-8") == saved
    assert stable.stabilise(copy) is False  # a second run changes nothing


def test_a_notebook_without_widgets_is_left_alone(tmp_path):
    copy = tmp_path / "01_guarantees.ipynb"
    shutil.copy(ROOT / "chapters" / "01_guarantees.ipynb", copy)
    before = copy.read_bytes()
    assert stable.stabilise(copy) is False
    assert copy.read_bytes() == before
