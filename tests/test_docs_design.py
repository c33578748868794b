"""The design document lives in the repository, the README points to it, and no page or
comment points outside the repository or speaks of numbered issues instead of the project."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SKIPPED = {"__pycache__", "node_modules", "build", "dist", "results"}  # generated or not ours
OUTSIDE = re.compile(r"\.\./shared|shared/DESIGN\.md|\bDESIGN\.md")  # the old design file, kept outside the repository
ISSUE = re.compile(r"\bissues? ?#? ?\d+", re.IGNORECASE)
SECTIONS = (
    "The data's path",
    "Roles and folders",
    "The model contract",
    "Privacy invariants",
    "The evaluation protocol",
    "The engines, and why they agree",
    "Layout",
)


def project_files(*suffixes: str) -> list[Path]:
    """Every file of the project with one of ``suffixes``, leaving out hidden folders (.git, .venv,
    caches), build output and installed metadata."""
    found = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIPPED or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and path.suffix in suffixes:
            found.append(path)
    return found


def test_the_design_document_is_in_the_repository_with_its_sections():
    assert DESIGN.is_file(), "docs/design.md is missing"
    headings = re.findall(r"^##+ (.+)$", DESIGN.read_text(), re.MULTILINE)
    missing = [s for s in SECTIONS if s not in headings]
    assert not missing, f"docs/design.md lacks the sections {missing}"


def test_the_readme_links_the_design_document():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"\]\(docs/design\.md(#[a-z0-9-]+)?\)", readme), "README.md must link docs/design.md"


def test_no_page_or_comment_points_to_a_design_outside_the_repository():
    files = project_files(".md", ".py", ".toml")
    assert len(files) > 50, "found too few files: did the walk break?"
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        if path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not offenders, "point to docs/design.md instead:\n" + "\n".join(offenders)


def test_no_page_or_comment_speaks_of_numbered_issues():
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in project_files(".md", ".py", ".toml")
        if path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if ISSUE.search(line)
    ]
    assert not offenders, "say what the code does, not which issue asked for it:\n" + "\n".join(offenders)


def test_every_test_the_design_document_names_exists():
    references = re.findall(r"`(?:tests/)?((?:[a-z_]+/)*test_[a-z_]+\.py)(?:::(test_[A-Za-z0-9_]+))?`", DESIGN.read_text())
    assert len([t for _, t in references if t]) >= 25, "the page names fewer tests than it should: did the parser break?"
    for file, test in references:
        path = ROOT / "tests" / file
        assert path.is_file(), f"docs/design.md names {file}, which does not exist"
        if test:
            assert re.search(rf"^(async )?def {test}\(", path.read_text(), re.MULTILINE), f"docs/design.md names {file}::{test}, which does not exist"


def test_every_module_the_design_document_names_exists():
    """``fedpref.a.b.name``: the longest prefix that is a module of fedpref, and the name after it
    defined there."""
    folders = {"client": "client", "server": "server", "models": "models", "simulations": "simulations"}
    names = sorted(set(re.findall(r"`(fedpref(?:\.[A-Za-z_]+)+)", DESIGN.read_text())))
    assert len(names) >= 20, "the page names fewer modules than it should: did the parser break?"
    for name in names:
        parts = name.split(".")[1:]
        assert parts[0] in folders, f"docs/design.md names {name}, outside fedpref's folders"
        for cut in range(len(parts), 0, -1):
            base = ROOT / folders[parts[0]] / Path(*parts[1:cut])
            source = base.with_suffix(".py") if cut > 1 and base.with_suffix(".py").is_file() else base / "__init__.py"
            if source.is_file():
                break
        rest = parts[cut:]
        if rest:
            assert re.search(rf"^(def|class) {rest[0]}\b|^{rest[0]}\s*[:=]|^from \S+ import .*\b{rest[0]}\b",
                             source.read_text(), re.MULTILINE), f"docs/design.md names {name}: {rest[0]} is not in {source.relative_to(ROOT)}"
