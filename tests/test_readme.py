"""The README's numbers that can be checked cheaply: the file map's line counts and the presets it quotes.

Run: python -m pytest -q tests/test_readme.py
"""
import re

from conftest import ROOT


def test_file_map_line_counts_are_current():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| \[`([^`]+)`\]\([^)]+\) \| (\d+) \|", readme, flags=re.M)
    assert len(rows) >= 10, rows
    for name, quoted in rows:
        path = ROOT / name
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        lines = sum(len(f.read_text().splitlines()) for f in files)
        assert int(quoted) == lines, f"README says {name} has {quoted} lines, it has {lines}"
