"""Write docs/PERFORMANCE.md from what the benchmarks measured.

    .venv/bin/python benchmarks/bench_engines.py     # Flower against the fast engine; 100 fast rounds
    .venv/bin/python benchmarks/bench_scale.py       # populations up to 1,000,000; aggregation; bytes
    .venv/bin/python benchmarks/bench_encoding.py    # what each update encoding costs in HR@10
    .venv/bin/python benchmarks/write_performance.py

Reads results/bench_engines.json, results/bench_scale.json and results/bench_encoding.json
(each benchmark writes its own) and writes every figure of docs/PERFORMANCE.md from them,
with the command that measured it; a part whose results are missing says which command to run.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import psutil

RESULTS = Path("results")
OUT = Path("docs/PERFORMANCE.md")


def load(name: str) -> dict | list | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def missing(command: str) -> str:
    return f"*Not measured yet: run `{command}`, then this script.*\n"


def engines_part(e: dict | None) -> str:
    if e is None:
        return missing(".venv/bin/python benchmarks/bench_engines.py")
    f, fast, h, local = e["flower"], e["fast"], e["hundred_rounds"], e["local_training"]
    met = "met" if e["speedup"] >= 20 else "**not met**"
    met_100 = "met" if h["wall_s"] <= 60 else "**not met**"
    return f"""Every device of `movielens-small` ({e['devices']}) trains in every round: MF over {e['items']:,} items, run-config
defaults (2 private and 3 joint local epochs of SGD, 20 negatives, FedAdam), no federated
evaluation, seed 0. Seconds between the ends of consecutive rounds in the server's `rounds.json`,
the first round left out (it starts Ray's workers, or loads the compiled code).

| engine | rounds measured | seconds per round (median) | rounds |
| --- | ---: | ---: | --- |
| Flower Simulation Engine (Ray, one SuperNode per device) | {len(f['round_seconds'])} | {f['median_round_s']:.2f} | {', '.join(f'{s:.1f}' for s in f['round_seconds'])} |
| fast engine | {len(fast['round_seconds'])} | {fast['median_round_s']:.3f} | {', '.join(f'{s:.2f}' for s in fast['round_seconds'])} |
| **ratio** | | **{e['speedup']:.0f}x** (target: at least 20x, {met}) | |

**{h['rounds']} rounds on the fast engine**, run-config defaults (every device evaluates every 5
rounds and after the last): **{h['wall_s']:.1f} s** in all (target: at most 60 s, {met_100}),
{h['median_round_s']:.2f} s a round (median, evaluation rounds included); test HR@10
{h['test_hr']:.4f} at round {h['chosen_round']}, chosen on validation.

**Local training per device** (one device at a time on one thread, every device of
`movielens-small`, median history {local['median_history']:.0f} items): `local_round` (torch, what a
SuperNode runs) {local['torch_ms']:.1f} ms, the fast engine's compiled round {local['compiled_ms']:.2f} ms:
{local['ratio']:.0f}x. All {local['devices']} devices: {local['torch_all_devices_s']:.1f} s against
{local['compiled_all_devices_s']:.2f} s.

(`.venv/bin/python benchmarks/bench_engines.py`)
"""


def scale_part(s: dict | None) -> str:
    if s is None:
        return missing(".venv/bin/python benchmarks/bench_scale.py")
    runs = s["runs"]
    lines = ["| devices | a round | seconds per round (median) | training per device | peak RSS |", "| ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(runs, key=lambda r: (r["population"], r["cohort"])):
        lines.append(f"| {r['population']:,} | {r['cohort']:,} | {r['median_round_s']:.2f} | {r['device_ms']:.2f} ms | {r['peak_rss_mb']:,.0f} MB |")
    million = next((r for r in runs if r["population"] == 1_000_000 and r["cohort"] == 10_000), None)
    bound = ""
    if million:
        met = "met" if million["median_round_s"] <= 10 else "**not met**"
        bound = (f"\n**A million devices, 10,000 a round: {million['median_round_s']:.2f} s a round** (bound: 10 s, {met}; rounds "
                 f"{', '.join(f'{x:.2f}' for x in million['round_seconds'])}), peak RSS {million['peak_rss_mb']:,.0f} MB with the private "
                 "vectors memory-mapped.\n")
    agg = ["| devices summed | fast engine: updates/s | holds | Flower FedAvg: updates/s | holds | ratio |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a in s["aggregation"]:
        flower = (f"{a['flower_updates_per_s']:,.0f} | {a['flower_replies_mb']:,.0f} MB of replies | {a['speedup']:.1f}x" if "flower_updates_per_s" in a
                  else f"not run | {a['flower_replies_mb'] / 1024:,.1f} GB of replies | ")
        agg.append(f"| {a['cohort']:,} | {a['fast_updates_per_s']:,.0f} | {a['fast_accumulator_mb']:.1f} MB accumulator + {a['fast_update_mb']:.2f} MB per update | {flower} |")
    threads = runs[0]["threads"] if runs else 2
    return f"""Synthetic populations (`synthetic:Nx10000`, seed 0: about 48 events a person), MF over
{s['items']:,} items, run-config defaults, no federated evaluation, {threads} threads; each
configuration runs in its own process, its private vectors memory-mapped, rounds after the
first.

![seconds per round against population size, one line per cohort size](img/fast-engine-scaling.png)

{chr(10).join(lines)}
{bound}
A round's cost follows the cohort, not the population: devices outside the cohort are a row of
the memory-mapped private vectors and a row of the population folder, neither read.

**Aggregation** of clipped updates (what the server does with a round's replies), 10,000 items,
dim 64: the fast engine adds each device's update (the rows it touched, about
{s['aggregation'][0]['mean_rows_per_update']:,.0f}) into one accumulator as it is trained; Flower's FedAvg
(`aggregate_arrayrecords`) averages one dense reply per device, all held at once.

{chr(10).join(agg)}

(`.venv/bin/python benchmarks/bench_scale.py`)
"""


def encoding_part(scale: dict | None, enc: list | None) -> str:
    parts = []
    if scale is not None:
        rows = ["| encoding | bytes per device per round | / float32 |", "| --- | ---: | ---: |"]
        rows += [f"| {r['encoding']} | {r['bytes_per_device_round']:,} | {r['ratio']:.2f}x |" for r in scale["encodings"]]
        parts.append(f"MF dim 64 over {scale['items']:,} items (the serialised reply arrays; `benchmarks/bench_scale.py`):\n\n" + "\n".join(rows))
    else:
        parts.append(missing(".venv/bin/python benchmarks/bench_scale.py"))
    if enc is not None:
        base = enc[0]
        rows = ["| encoding | bytes per device per round | / float32 | test HR@10 | - float32 |", "| --- | ---: | ---: | ---: | ---: |"]
        rows += [f"| {r['encoding']} | {r['bytes_per_device_round']:,} | {r['bytes_per_device_round'] / base['bytes_per_device_round']:.2f}x | "
                 f"{r['test_hr']:.4f} | {r['test_hr'] - base['test_hr']:+.4f} |" for r in enc]
        parts.append("movielens-small (9,066 items), 40 rounds, a tenth of the devices a round, in-process engine, and what each costs "
                     "in test HR@10 (`benchmarks/bench_encoding.py`):\n\n" + "\n".join(rows))
    else:
        parts.append(missing(".venv/bin/python benchmarks/bench_encoding.py"))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    engines, scale, enc = load("bench_engines"), load("bench_scale"), load("bench_encoding")
    if isinstance(enc, dict):
        enc = enc.get("rows")
    machine = f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU, {platform.python_implementation()} {platform.python_version()}"
    text = f"""# Performance

Every figure here was measured by a committed benchmark on this project's machine ({machine});
`.venv/bin/python benchmarks/write_performance.py` writes this page from their results
(`results/*.json`). Timings on this machine vary by about a tenth from run to run; each is one run.

Rerun everything:

```bash
.venv/bin/python benchmarks/bench_engines.py
.venv/bin/python benchmarks/bench_scale.py
.venv/bin/python benchmarks/bench_encoding.py
.venv/bin/python benchmarks/write_performance.py
```

Which engine to use, and what the fast one computes, is in [federated.md](federated.md#three-engines-one-server).

## Flower's Simulation Engine against the fast engine

{engines_part(engines)}
## Seconds per round against population and cohort size

{scale_part(scale)}
## Bytes per device per round

{encoding_part(scale, enc)}"""
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
