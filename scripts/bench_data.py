"""Benchmark the data stages (validate, dedup, split) at growing numbers of chat records.

Generates ticket records with scripts/make_tickets.py (its defects and duplicates included),
runs each stage as `python -m stages.<name>` in a scratch copy of the project, and prints wall
time and peak memory (the largest process: the stage or one of its workers) per stage and
size, and each size's time against the smallest (linear = the size ratio).

    python scripts/bench_data.py                          # 10k and 100k
    python scripts/bench_data.py --sizes 10000 100000 1000000
    DATA_WORKERS=1 python scripts/bench_data.py           # one process per stage

Needs models/base (the tokenizer): `dvc repro base_model` makes it.
"""

from __future__ import annotations

import argparse
import os
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
# what the data stages read besides data.path: the fixed test set, replay rows, the forgetting
# probe and review sheets
DATA_FOLDERS = ("data/eval", "data/replay", "data/general", "data/review")


def run_stage(stage: str, project: Path, env: dict) -> tuple[float, float, str, str]:
    """(seconds, peak MiB, stdout, stderr) of one stage run. The peak is the stage's largest
    process, its workers included: their memory is reported to the stage when they end."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode:
            sys.exit(f"{stage} failed in {project}:\n{err.read()[-2000:]}")
        return seconds, usage.ru_maxrss / 1024, out.read(), err.read()


def run_size(rows: int, scratch: Path) -> dict[str, tuple[float, float]]:
    project = scratch / f"p{rows}"
    for rel in ("stages", "conf", "params.yaml", *DATA_FOLDERS):
        src = ROOT / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / rel)
    (project / "models").mkdir()
    os.symlink(ROOT / "models/base", project / "models/base")
    (project / "data/raw").mkdir(parents=True, exist_ok=True)
    (project / "data/raw/tickets.jsonl").write_text("\n".join(generate(rows, seed=1)) + "\n")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(project)}
    out = {}
    for stage in STAGES:
        seconds, peak, stdout, _ = run_stage(stage, project, env)
        last = [line for line in stdout.splitlines() if line.startswith(f"{stage}:")]
        print(
            f"  {rows:>8} rows  {stage:<8} {seconds:6.1f} s  peak {peak:7.0f} MiB  "
            f"{last[-1][:110] if last else ''}",
            flush=True,
        )
        out[stage] = (seconds, peak)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    if not (ROOT / "models/base/tokenizer.json").exists():
        sys.exit("models/base is missing: run `dvc repro base_model` first")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    print(
        f"data stages on {os.cpu_count()} cores, DATA_WORKERS={os.environ.get('DATA_WORKERS', '')}"
        f"; dedup threshold {params['dedup']['threshold']}, "
        f"split group_threshold {params['split'].get('group_threshold')}"
    )
    sizes = sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        results = {}
        for size in sizes:
            results[size] = run_size(size, Path(tmp))
            shutil.rmtree(Path(tmp) / f"p{size}")  # a million records take gigabytes
    smallest = sizes[0]
    print(f"\n{'stage':<10}" + "".join(f"{s:>10}" for s in sizes) + "   time ratio to the first")
    for stage in (*STAGES, "total"):
        times = [
            sum(t for t, _ in results[s].values()) if stage == "total" else results[s][stage][0]
            for s in sizes
        ]
        ratios = "  ".join(f"{t / times[0]:5.1f}" for t in times[1:])
        print(f"{stage:<10}" + "".join(f"{t:>9.1f}s" for t in times) + f"   {ratios}")
    print(
        f"{'linear':<10}"
        + " " * 10 * len(sizes)
        + "   "
        + "  ".join(f"{s / smallest:5.0f}" for s in sizes[1:])
    )
    for size in sizes:
        peaks = ", ".join(f"{stage} {results[size][stage][1]:.0f}" for stage in STAGES)
        print(f"peak MiB at {size}: {peaks}")


if __name__ == "__main__":
    main()
