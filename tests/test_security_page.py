"""docs/SECURITY.md names, for each promise, the test that attacks it: every test it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def named_tests(text: str) -> list[tuple[str, str | None]]:
    """(file, test or None) for each test reference in the page; a bare ``::test_x`` belongs
    to the last file named before it in the same table cell."""
    found = []
    for cell in re.split(r"\|", text):
        current = None
        for match in re.finditer(r"`(?:tests/)?((?:[a-z_]+/)*test_[a-z_]+\.py)?(?:::(test_[A-Za-z0-9_]+))?", cell):
            file, test = match.groups()
            if file:
                current = file
            if file or test:
                assert current is not None, f"{match.group(0)}: a test named before any file"
                found.append((current, test))
    return found


def test_every_test_the_security_page_names_exists():
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    references = named_tests(text)
    assert len({test for _, test in references if test}) >= 60, "the page names fewer tests than it should: did the parser break?"
    for file, test in references:
        path = ROOT / "tests" / file
        assert path.is_file(), f"docs/SECURITY.md names {file}, which does not exist"
        if test:
            assert re.search(rf"^(async )?def {test}\(", path.read_text(), re.MULTILINE), f"docs/SECURITY.md names {file}::{test}, which does not exist"
