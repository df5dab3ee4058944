"""The repository stands alone: nothing in it points to files outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A path into the team's notes folder next to the checkout, or citations of their sections. Spelt
# in pieces so that this file does not match itself.
_NOTES, _CITE = "shared", "SPEC" + " §"
OUTSIDE = re.compile(rf"\.\./{_NOTES}|(?<![\w-]){_NOTES}/|{_CITE}")


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [ROOT / name for name in out.split("\0") if name]
    return [f for f in files if f.is_file() and f.suffix not in {".png", ".jpg", ".tsv"}]


def test_no_reference_leaves_the_repository() -> None:
    hits = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_must() -> None:
    for bad in (f"see ../{_NOTES}/notes.md", f"``{_NOTES}/reference/x.tsv``", f"({_CITE}4)"):
        assert OUTSIDE.search(bad), bad
    for fine in ("copied into shared memory", "docs/rtdetrv2.md §4", "tests/reference/x.tsv"):
        assert not OUTSIDE.search(fine), fine
