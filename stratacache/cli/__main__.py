"""``python -m stratacache.cli``: the same as the ``stratacache`` console script."""

import sys

from stratacache.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
