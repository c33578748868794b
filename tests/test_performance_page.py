"""benchmarks/write_performance.py writes docs/PERFORMANCE.md from the benchmarks' results."""

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_writer():
    spec = importlib.util.spec_from_file_location("write_performance", ROOT / "benchmarks" / "write_performance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_carries_the_measured_figures_and_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    writer = load_writer()
    writer.main()
    page = (tmp_path / "docs" / "PERFORMANCE.md").read_text()
    assert page.count("Not measured yet") == 4 and "benchmarks/bench_engines.py" in page

    (tmp_path / "results").mkdir()
    for name in ("bench_engines", "bench_scale", "bench_encoding"):
        shutil.copy(ROOT / "tests" / "data" / f"{name}.json", tmp_path / "results" / f"{name}.json")
    writer.main()
    page = (tmp_path / "docs" / "PERFORMANCE.md").read_text()
    engines = json.loads((tmp_path / "results" / "bench_engines.json").read_text())
    assert "Not measured yet" not in page
    assert f"**{engines['speedup']:.0f}x**" in page and f"**{engines['hundred_rounds']['wall_s']:.1f} s**" in page
    assert "A million devices, 10,000 a round: 4.23 s a round" in page and "(bound: 10 s, met" in page
    assert "| int8 | 650,520 | 0.25x |" in page
    assert "not run | 24.2 GB of replies" in page
