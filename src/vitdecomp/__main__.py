"""``python -m vitdecomp``: the same command as ``vitdecomp``."""

import sys

from vitdecomp.cli import main

if __name__ == "__main__":
    sys.exit(main())
