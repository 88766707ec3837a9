"""README.md is kept true where it documents the code: its record table lists exactly the fields each record
type is checked for on read (utils.SCHEMAS)."""

import re
from pathlib import Path

from utils import SCHEMAS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table_rows(heading: str) -> list[list[str]]:
    """The cells of the rows of the first table under a README heading."""
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_the_record_table_lists_what_each_record_is_checked_for():
    documented = {}
    for _, kind, checked, _ in table_rows("## Record types"):
        documented[kind.strip("`")] = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", checked))  # not what parentheses say
    assert set(documented) == set(SCHEMAS)
    for kind, fields in SCHEMAS.items():
        assert documented[kind] == list(fields), kind
