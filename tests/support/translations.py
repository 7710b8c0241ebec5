"""``scripts/i18n.py``, the translations' machinery, loaded as the module ``i18n``."""

from __future__ import annotations

import importlib.util
import sys

from support import ROOT

spec = importlib.util.spec_from_file_location("i18n", ROOT / "scripts" / "i18n.py")
i18n = importlib.util.module_from_spec(spec)
sys.modules["i18n"] = i18n  # its dataclasses look their module up there
spec.loader.exec_module(i18n)
