"""Run every method x objective switch through DVC on the configured model and print each
stage's peak memory and time: the check that no documented switch is killed for memory.

Each pair is `dvc repro` after composing `method=M objective=O` with a few training steps (the
evaluation is the full one: the test set, answer budget and general set the config names).
Runs in a throwaway clone of HEAD, so your workspace, params.yaml and dvc.lock are untouched
(commit what you want checked). Each stage runs as `dvc repro --single-item` under GNU time;
the peak is the largest resident set of the stage (DVC's own process included).

    python scripts/check_switches.py             # 12 pairs: hours on 2 CPU cores (DPO ~30 min)
    python scripts/check_switches.py --pairs lora:cpt full:dpo --steps 2
    python scripts/check_switches.py --json switches.json -- export.check_examples=2

`--json` rewrites the file after every stage, so a check stopped midway keeps its figures.

Exit 1 when a stage fails or is killed (the table says which).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TIME = "/usr/bin/time"  # GNU time: %M is the peak resident set in KiB
METHODS = sorted(p.stem for p in (ROOT / "conf/method").glob("*.yaml"))
OBJECTIVES = sorted(p.stem for p in (ROOT / "conf/objective").glob("*.yaml"))
# pairs train refuses by design: virtual tokens steer generation, a reward model generates not
REFUSED = {("prefix", "reward"), ("prompt", "reward")}


def machine_memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_stage(project: Path, stage: str, env: dict) -> dict:
    timing = project / ".stage-time"
    start = time.perf_counter()
    done = subprocess.run(
        [TIME, "-f", "%M", "-o", str(timing), "dvc", "repro", "--single-item", stage],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = timing.read_text().split() if timing.exists() else []
    killed = "signal" in timing.read_text() if timing.exists() else False
    failed = done.returncode != 0
    errors = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "error" in line.lower() or "killed" in line.lower()
    ]
    # the stage's own memory plan, to compare with what it used
    plan = [line for line in done.stdout.splitlines() if line.startswith(f"{stage}: plan:")]
    return {
        "stage": stage,
        "ran": "Running stage" in done.stdout,
        "plan": plan[-1] if plan else None,
        "peak_gib": round(int(lines[-1]) / 2**20, 2) if lines and lines[-1].isdigit() else None,
        "seconds": round(time.perf_counter() - start, 1),
        "status": "killed" if killed else "failed" if failed else "ok",
        "error": errors[-1][:300] if failed and errors else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs",
        nargs="*",
        metavar="METHOD:OBJECTIVE",
        help="default: every method with every objective",
    )
    parser.add_argument("--steps", type=int, default=4, help="training steps per pair")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every pair")
    args = parser.parse_args()
    pairs = (
        [tuple(p.split(":")) for p in args.pairs]
        if args.pairs
        else [(m, o) for m in METHODS for o in OBJECTIVES if (m, o) not in REFUSED]
    )
    if not shutil.which("dvc") or not Path(TIME).exists():
        sys.exit("needs dvc on PATH (`source .venv/bin/activate`) and GNU time at /usr/bin/time")

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results = []
    print(
        f"{len(pairs)} pairs, {args.steps} steps each, on a machine with "
        f"{machine_memory_gib():.1f} GiB",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="check-switches-") as tmp:
        project = Path(tmp) / "project"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
        stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
        for method, objective in pairs:
            overrides = [
                f"method={method}",
                f"objective={objective}",
                f"train.max_steps={args.steps}",
                f"train.eval_steps={args.steps}",
                *([f"objective.steps={args.steps}"] if objective == "grpo" else []),  # its RL phase
                "eval.min_safety=null",  # a few steps teach no format: this checks the wiring
                *args.overrides,
            ]
            subprocess.run(
                [sys.executable, "-m", "stages.common.compose", *overrides],
                cwd=project,
                env=env,
                check=True,
                capture_output=True,
            )
            for stage in stages:
                result = {
                    "method": method,
                    "objective": objective,
                    **run_stage(project, stage, env),
                }
                results.append(result)
                if args.json:  # after every stage: a long check stopped midway keeps its figures
                    args.json.write_text(json.dumps(results, indent=1) + "\n")
                if result["ran"] or result["status"] != "ok":
                    print(
                        f"{method:>6} {objective:<4} {stage:<10} {result['status']:<7} "
                        f"peak {result['peak_gib'] or 0:5.2f} GiB {result['seconds']:7.1f} s"
                        + (f"  {result['plan']}" if result["plan"] else "")
                        + (f"  {result['error']}" if result["error"] else ""),
                        flush=True,
                    )
                if result["status"] != "ok":
                    break

    print(f"\n{'method':<8}{'objective':<11}{'peak GiB (stage)':<26}{'minutes':>8}  status")
    for method, objective in pairs:
        rows = [r for r in results if (r["method"], r["objective"]) == (method, objective)]
        top = max(rows, key=lambda r: r["peak_gib"] or 0)
        status = next((f"{r['stage']} {r['status']}" for r in rows if r["status"] != "ok"), "ok")
        print(
            f"{method:<8}{objective:<11}{top['peak_gib'] or 0:>5.2f} ({top['stage']})"
            f"{'':<{20 - len(top['stage'])}}"
            f"{sum(r['seconds'] for r in rows) / 60:>7.1f}  {status}"
        )
    sys.exit(any(r["status"] != "ok" for r in results))


if __name__ == "__main__":
    main()
