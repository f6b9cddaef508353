"""Benchmark the data stages (validate, dedup, split) at 10k and 100k chat records.

Generates ticket records with scripts/make_tickets.py (its defects and duplicates included),
runs each stage as `python -m stages.<name>` in a scratch copy of the project, and prints wall
time and peak memory per stage and size, and the 100k/10k time ratio (10 = linear).

    python scripts/bench_data.py                 # 10k and 100k
    python scripts/bench_data.py --sizes 2000 20000

Needs models/base (the tokenizer): `dvc repro base_model` makes it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_tickets import generate  # noqa: E402

STAGES = ("validate", "dedup", "split")


def peak_child_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_size(rows: int, scratch: Path) -> dict[str, tuple[float, float]]:
    project = scratch / f"p{rows}"
    for rel in ("stages", "conf", "params.yaml"):
        src = ROOT / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / rel)
    (project / "models").mkdir()
    os.symlink(ROOT / "models/base", project / "models/base")
    (project / "data/raw").mkdir(parents=True)
    (project / "data/raw/tickets.jsonl").write_text("\n".join(generate(rows, seed=1)) + "\n")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(project)}
    out = {}
    for stage in STAGES:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"{stage} failed at {rows} rows:\n{done.stderr[-2000:]}")
        last = [line for line in done.stdout.splitlines() if line.startswith(f"{stage}:")]
        print(
            f"  {rows:>7} rows  {stage:<8} {seconds:6.1f} s  peak {peak_child_mib():7.0f} MiB  "
            f"{last[-1] if last else ''}",
            flush=True,
        )
        out[stage] = (seconds, peak_child_mib())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000])
    args = parser.parse_args()
    if not (ROOT / "models/base/tokenizer.json").exists():
        sys.exit("models/base is missing: run `dvc repro base_model` first")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    print(
        f"data stages on {os.cpu_count()} cores; dedup threshold {params['dedup']['threshold']}, "
        f"split group_threshold {params['split'].get('group_threshold')}"
    )
    small, large = args.sizes
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        results = {size: run_size(size, Path(tmp)) for size in (small, large)}
    total = {size: sum(s for s, _ in r.values()) for size, r in results.items()}
    print(f"\n{'stage':<10}{small:>10}{large:>10}   ratio")
    for stage in STAGES:
        a, b = results[small][stage][0], results[large][stage][0]
        print(f"{stage:<10}{a:>9.1f}s{b:>9.1f}s   {b / a:5.1f}")
    print(
        f"{'total':<10}{total[small]:>9.1f}s{total[large]:>9.1f}s   "
        f"{total[large] / total[small]:5.1f}   (linear = {large / small:.0f})"
    )
    print(
        f"peak memory of any stage: "
        f"{max(m for r in results.values() for _, m in r.values()):.0f} MiB"
    )


if __name__ == "__main__":
    main()
