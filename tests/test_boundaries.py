"""The folder roles of docs/design.md: who may import whom.

models imports neither client, server nor simulations; client and server never import each
other (what they share is the model contract and Flower's messages); only simulations sees
everything.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "models": ("fedpref.client", "fedpref.server", "fedpref.simulations"),
    "client": ("fedpref.server", "fedpref.simulations"),
    "server": ("fedpref.client", "fedpref.simulations"),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_only_what_its_role_allows(folder):
    offenders = []
    for path in (ROOT / folder).rglob("*.py"):
        for name in imports_of(path):
            if name.startswith(FORBIDDEN[folder]) or name.split(".")[0] in ("client", "server", "models", "simulations"):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "; ".join(offenders)
