"""``python -m stratacache.config --tables [FILE ...]``: regenerate the key tables.

The tables of README.md and docs/config.md (by default those of the source tree
this package lives in) are rewritten from the schema's models, between their
marker lines; the rest of each file is left as it is.
"""

import argparse
import sys
from pathlib import Path

from stratacache.config import ConfigError, with_current_table

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = (REPO / "README.md", REPO / "docs" / "config.md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stratacache.config", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", action="store_true", required=True,
                        help="rewrite the key table in each FILE from the schema")
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE",
                        help="Markdown files holding a key table (default: README.md docs/config.md)")
    args = parser.parse_args(argv)
    for path in args.files or DOCUMENTS:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            print(f"error: {path}: {exc.strerror}", file=sys.stderr)
            return 1
        try:
            new = with_current_table(text, str(path))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if new != text:
            path.write_text(new, encoding="utf-8")
        print(f"{path}: {'updated' if new != text else 'current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
