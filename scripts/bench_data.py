"""Benchmark the data stages (validate, dedup, split) at growing numbers of chat records.

Generates ticket records with scripts/make_tickets.py (its defects and duplicates included),
runs each stage as `python -m stages.<name>` in a scratch copy of the project, and prints wall
time and peak memory (the largest process: the stage or one of its workers) per stage and
size, and each size's time against the smallest (linear = the size ratio).

    python scripts/bench_data.py                          # 10k and 100k
    python scripts/bench_data.py --sizes 10000 100000 1000000
    DATA_WORKERS=1 python scripts/bench_data.py           # one process per stage
    python scripts/bench_data.py --sizes 100000 --compare c3bb497

--compare REV also runs the stages of git revision REV (a worktree of it) on the same records
and checks that every output of the three stages is the same bytes: a change that makes the
stages faster must not change what they write. Its times and peaks print beside ours.

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


# Runs a command and writes its peak resident memory (KiB: the largest of the command and of
# the worker processes it waited for) to a file. The stage starts from this small process, not
# from the benchmark, because Linux counts the memory of the process that starts a program
# towards the program's own peak (the benchmark holds a million generated records).
MEASURE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_stage(stage: str, project: Path, env: dict) -> tuple[float, float, str, str]:
    """(seconds, peak MiB, stdout, stderr) of one stage run; the peak is the stage's largest
    process, its workers included."""
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r") as peak,
    ):
        start = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-c", MEASURE, peak.name, sys.executable, "-m", f"stages.{stage}"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=err,
        )
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if code:
            sys.exit(f"{stage} failed in {project}:\n{err.read()[-2000:]}")
        return seconds, int(peak.read()) / 1024, out.read(), err.read()


# every output of the three stages (dvc.yaml's outs of validate, dedup and split)
OUTPUTS = ("data/interim", "data/processed", "reports/data_docs") + tuple(
    f"reports/{stage}.json" for stage in STAGES
)


def make_project(rows: int | Path, project: Path, code: Path) -> None:
    """A scratch project: the stages of `code`, this checkout's config and data folders, and
    `rows` generated ticket records as data/raw/tickets.jsonl (or a copy of that file)."""
    shutil.copytree(code / "stages", project / "stages")
    for rel in ("conf", "params.yaml", *DATA_FOLDERS):
        src = ROOT / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / rel)
    (project / "models").mkdir()
    os.symlink(ROOT / "models/base", project / "models/base")
    (project / "data/raw").mkdir(parents=True, exist_ok=True)
    if isinstance(rows, Path):
        shutil.copy2(rows, project / "data/raw/tickets.jsonl")
        return
    with (project / "data/raw/tickets.jsonl").open("w") as f:
        f.writelines(line + "\n" for line in generate(rows, seed=1))


def run_size(rows: int, project: Path, label: str = "") -> dict[str, tuple[float, float]]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(project)}
    out = {}
    for stage in STAGES:
        seconds, peak, stdout, _ = run_stage(stage, project, env)
        last = [line for line in stdout.splitlines() if line.startswith(f"{stage}:")]
        print(
            f"  {label}{rows:>8} rows  {stage:<8} {seconds:6.1f} s  peak {peak:7.0f} MiB  "
            f"{last[-1][:110] if last else ''}",
            flush=True,
        )
        out[stage] = (seconds, peak)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--compare", metavar="REV", help="check outputs against git revision REV")
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        help="data.engine of the measured run (REV's run keeps params.yaml's): with --compare "
        "HEAD, what Ray costs against the local engine, on the same records",
    )
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
            project = Path(tmp) / f"p{size}"
            make_project(size, project, ROOT)
            if args.engine:
                params_file = project / "params.yaml"
                project_params = yaml.safe_load(params_file.read_text())
                project_params["data"]["engine"] = args.engine
                params_file.write_text(yaml.safe_dump(project_params, sort_keys=False))
            results[size] = run_size(size, project)
            if args.compare:
                compare(args.compare, size, project, Path(tmp))
            shutil.rmtree(project)  # a million records take gigabytes
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


def compare(revision: str, size: int, project: Path, scratch: Path) -> None:
    """Run revision's stages on the same records; every output must be the same bytes."""
    code, reference = scratch / "reference-code", scratch / f"reference{size}"
    if not code.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(code), revision],
            check=True,
            capture_output=True,
        )
    try:
        make_project(project / "data/raw/tickets.jsonl", reference, code)
        run_size(size, reference, label=f"{revision[:10]} ")
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(code)], check=False
        )
    differ = []
    for rel in OUTPUTS:
        ours, theirs = project / rel, reference / rel
        files = [ours] if ours.is_file() else sorted(p for p in ours.rglob("*") if p.is_file())
        for path in files:
            other = theirs / path.relative_to(ours) if path != ours else theirs
            if not other.is_file() or other.read_bytes() != path.read_bytes():
                differ.append(str(path.relative_to(project)))
    shutil.rmtree(reference)
    if differ:
        sys.exit(f"outputs differ from {revision} at {size} records: {differ}")
    print(f"  {size} records: every output is the same bytes as {revision}'s", flush=True)


if __name__ == "__main__":
    main()
