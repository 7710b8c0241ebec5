"""The README and the "Running the lab" pages, read as text: their bash blocks and lines."""

from __future__ import annotations

import re
import textwrap

from support import ROOT

LAB = ROOT / "lab"
README = ROOT / "README.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]+)[^\n]*\n(?P<body>.*?)^(?P=indent)```",
                   re.M | re.S)


def bash_blocks(text: str) -> list[str]:
    """The page's ```bash blocks, dedented (those inside list items too)."""
    return [textwrap.dedent(m["indent"] + m["body"]) if m["indent"] else m["body"]
            for m in FENCE.finditer(text) if m["lang"] == "bash"]


def shell_lines(block: str) -> list[str]:
    """One line per command: continuations joined."""
    return block.replace("\\\n", " ").splitlines()
