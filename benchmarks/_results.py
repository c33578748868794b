"""Where every benchmark writes what it printed: ``results/<name>.json``."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(name: str, data: object) -> Path:
    out = Path("results") / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return out
