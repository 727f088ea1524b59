"""The front door stays a five-minute read, and no link in the documentation points
nowhere."""

from __future__ import annotations

import re
from pathlib import Path

from streamproc.cli.failures import Exit

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_the_readme_is_a_five_minute_read() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    for page in ("architecture", "operations", "configuration", "wire-schema", "security",
                 "benchmark", "openai"):
        assert f"docs/{page}.md" in "\n".join(lines)


def test_every_relative_link_points_at_a_file() -> None:
    broken = []
    for page in PAGES:
        for target, _ in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken


def test_the_exit_codes_page_lists_every_code() -> None:
    page = (ROOT / "docs" / "operations.md").read_text()
    table = page[page.index("## Exit codes"):]
    listed = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert listed == {int(code) for code in Exit}
