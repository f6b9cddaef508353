"""Stage split: seeded train / validation / test split, stratified by the task's label fields.

Within each stratum (the combined values of `task.stratify_by`) rows are shuffled with the seed;
each split gets its fraction of every stratum, with largest-remainder rounding so the split
sizes match the fractions overall. Rows of a split keep their original order, so the same seed
gives byte-identical files. Exact prompt overlap between test and train is counted as a leakage
check (dedup already merged repeated prompts, so it should be zero).

Outputs: data/processed/{train,validation,test}.jsonl, reports/split.json.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, defaultdict
from pathlib import Path

from stages.common import tracking
from stages.common.config import StageError, load_params, run_stage
from stages.common.files import md5_path, read_jsonl, write_json, write_jsonl
from stages.common.records import normalize_text, prompt_messages
from stages.common.task import Task

INPUT = Path("data/interim/dedup.jsonl")
OUT_DIR = Path("data/processed")
REPORT = Path("reports/split.json")
SPLITS = ("train", "validation", "test")


def quotas(sizes: dict[str, int], fraction: float) -> dict[str, int]:
    """Rows per stratum for one split: floors plus the largest remainders up to the total."""
    target = round(sum(sizes.values()) * fraction)
    exact = {s: n * fraction for s, n in sizes.items()}
    out = {s: math.floor(x) for s, x in exact.items()}
    by_remainder = sorted(sizes, key=lambda s: (-(exact[s] - out[s]), s))
    for s in by_remainder[: max(0, target - sum(out.values()))]:
        out[s] += 1
    return out


def stratified_split(strata: list[str], fractions: dict[str, float], seed: int) -> list[str]:
    """The split name of each row."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        members[s].append(i)
    for s, rows in members.items():
        # per-stratum stream: adding a stratum does not reshuffle the others
        salt = int(hashlib.sha1(s.encode()).hexdigest()[:8], 16)
        random.Random(seed * 1_000_003 + salt).shuffle(rows)
    sizes = {s: len(rows) for s, rows in members.items()}
    test_q = quotas(sizes, fractions["test"])
    left = {s: sizes[s] - test_q[s] for s in sizes}
    val_fraction = fractions["validation"] / max(1e-9, 1 - fractions["test"])
    val_q = quotas(left, val_fraction)
    assignment = [""] * len(strata)
    for s, rows in members.items():
        for k, i in enumerate(rows):
            assignment[i] = ("test" if k < test_q[s] else
                             "validation" if k < test_q[s] + val_q[s] else "train")
    return assignment


def main() -> None:
    params = load_params()
    fractions = {name: float(params["split"][name]) for name in SPLITS}
    if abs(sum(fractions.values()) - 1) > 1e-6 or min(fractions.values()) < 0:
        raise StageError(f"split fractions {fractions} must be non-negative and sum to 1")
    task, seed = Task.from_params(params), int(params["seed"])

    with tracking.stage_run("split", params, ["split", "task"], {"dedup": md5_path(INPUT)}) as run:
        records = read_jsonl(INPUT)
        if len(records) < len(SPLITS):
            raise StageError(f"{INPUT}: {len(records)} records are too few to split")
        strata = [task.stratum(r["messages"][-1]["content"]) for r in records]
        assignment = stratified_split(strata, fractions, seed)

        parts = {name: [r for r, a in zip(records, assignment) if a == name] for name in SPLITS}
        for name, rows in parts.items():
            write_jsonl(OUT_DIR / f"{name}.jsonl", rows)

        train_prompts = {normalize_text(str(prompt_messages(r))) for r in parts["train"]}
        leaked = [r["id"] for r in parts["test"]
                  if normalize_text(str(prompt_messages(r))) in train_prompts]
        balance = {name: dict(sorted(Counter(s for s, a in zip(strata, assignment) if a == name)
                                     .items())) for name in SPLITS}
        report = {
            "rows_in": len(records),
            "rows_out": sum(len(p) for p in parts.values()),
            "rows_removed": 0,
            "sizes": {name: len(rows) for name, rows in parts.items()},
            "fractions": fractions,
            "stratify_by": task.stratify_by,
            "class_balance": balance,
            "leakage": {"test_prompts_in_train": len(leaked), "ids": leaked[:20]},
        }
        assert report["rows_in"] == report["rows_out"] + report["rows_removed"]
        write_json(REPORT, report)
        run.summary.update({f"split/{n}": len(p) for n, p in parts.items()})
        run.summary["split/leaked_test_prompts"] = len(leaked)
        print(f"split: {report['sizes']}, test prompts also in train: {len(leaked)}")


if __name__ == "__main__":
    run_stage(main)
