"""``python -m deliverylab …``: the same command as ``deliverylab …``."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
