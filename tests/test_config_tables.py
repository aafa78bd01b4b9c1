"""The README's and docs/config.md's key tables are generated from the schema's models and current."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stratacache.config import TABLE_BEGIN, TABLE_END, ConfigError, config_table_markdown, describe_config

REPO = Path(__file__).resolve().parent.parent
REGENERATE = "python -m stratacache.config --tables"


@pytest.mark.parametrize("document", ["README.md", "docs/config.md"])
def test_committed_table_is_the_generated_one(document):
    text = (REPO / document).read_text(encoding="utf-8")
    assert text.count(TABLE_BEGIN) == 1 and text.count(TABLE_END) == 1, document
    committed = text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN):text.index(TABLE_END)].strip("\n")
    assert committed == config_table_markdown().strip("\n"), \
        f"{document}: the key table is stale; regenerate it with `{REGENERATE}`"


def test_table_has_one_row_per_key_with_its_description():
    rows = config_table_markdown().splitlines()[2:]
    described = describe_config()
    assert len(rows) == len(described)
    for row, (key, _type, _default, doc) in zip(rows, described):
        assert row.startswith(f"| `{key}` |") and row.endswith(f" | {doc} |")


def test_regenerate_command_rewrites_only_the_table(tmp_path):
    """The documented command, run on stale copies, restores the generated tables and leaves
    the text around them byte for byte."""
    copies = []
    for document in ("README.md", "docs/config.md"):
        original = (REPO / document).read_text(encoding="utf-8")
        begin = original.index(TABLE_BEGIN) + len(TABLE_BEGIN)
        stale = original[:begin] + "\n| key | type | default | meaning |\n|---|---|---|---|\n" \
            + "| `tiers.cpu.gone` | bool | `true` | a key that no longer exists |\n" \
            + original[original.index(TABLE_END):]
        copy = tmp_path / document.replace("/", "_")
        copy.write_text(stale, encoding="utf-8")
        copies.append((copy, original))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "stratacache.config", "--tables"] + [str(c) for c, _o in copies]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    for copy, original in copies:
        assert copy.read_text(encoding="utf-8") == original
        assert f"{copy}: updated" in res.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and again.stdout.count(": current") == 2


def test_regenerate_refuses_a_file_without_markers(tmp_path):
    from stratacache.config import with_current_table
    with pytest.raises(ConfigError, match="notes.md: no key table to regenerate"):
        with_current_table("# notes\n\n| key | type |\n", "notes.md")
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "stratacache.config", "--tables", str(tmp_path / "config.yaml")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1 and "no key table to regenerate" in res.stderr
    assert "Traceback" not in res.stderr
    assert (tmp_path / "config.yaml").read_text() == (REPO / "config.yaml").read_text()
