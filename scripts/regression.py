"""Regression check: this run's metrics against a baseline, with the data and config changes
that came with them (`make regression`).

    python scripts/regression.py                    # baseline: the last commit (HEAD)
    python scripts/regression.py --baseline v1.2    # a git revision (tag, branch, sha)
    python scripts/regression.py --baseline lr-2e-3 # a DVC experiment name

1. Comparable? Both runs must have scored the same test set: the content hash evaluate wrote
   into reports/metrics.json (`test_set.sha256`). A different hash is "not comparable"
   (exit 2), never a pass or a fail: metrics measured on two test sets differ for that alone.
2. Judged: the tuned model's metrics in reports/metrics.json of both runs. A metric
   with per-example scores (reports/predictions.jsonl of both runs, paired by example) gets a
   paired bootstrap interval of (now - baseline); it regresses when the interval lies wholly
   on the worse side AND the drop exceeds its tolerance. Corpus-level metrics and the
   forgetting deltas are judged on the tolerance alone. Settings: `regression` in params.yaml.
3. Context: the data (every data/ dep and out of dvc.lock whose md5 differs) and the params
   (`dvc params diff`) that changed since the baseline.

Exit code: 0 no regression, 1 a regression, 2 not comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

METRICS = "reports/metrics.json"
PREDICTIONS = "reports/predictions.jsonl"
NOT_COMPARABLE = 2


def experiment_rev(name: str) -> str | None:
    """The commit of a DVC experiment with this name, if there is one."""
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json", "-A"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        return None
    try:
        shown = json.loads(out.stdout[out.stdout.index("[") :])
    except ValueError:
        return None
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if exp.get("name") == name:
                return exp["revs"][0]["rev"]
    return None


def resolve(baseline: str) -> str:
    found = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{baseline}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode == 0:
        return found.stdout.strip()
    rev = experiment_rev(baseline)
    if rev is None:
        sys.exit(f"error: baseline {baseline!r} is neither a git revision nor a DVC experiment")
    return rev


def not_comparable(old_metrics: dict, new_metrics: dict) -> str | None:
    """Why two runs' metrics cannot be compared (None when they can): another test set."""
    old, new = (m.get("test_set") or {} for m in (old_metrics, new_metrics))
    if not old.get("sha256"):
        return "the baseline's metrics carry no test-set hash (made before it was recorded)"
    if old["sha256"] != new.get("sha256"):
        return (
            f"the test set changed: {old.get('examples')} examples, sha256 "
            f"{old['sha256'][:12]} -> {new.get('examples')} examples, sha256 "
            f"{str(new.get('sha256'))[:12]}"
        )
    return None


def at_revision(rev: str, path: str) -> str | None:
    """A git-tracked file as it was at a revision (None when it was not there)."""
    out = subprocess.run(
        ["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=False
    )
    return out.stdout if out.returncode == 0 else None


def paired_scores(old_rows: list[dict], new_rows: list[dict]) -> dict[str, tuple]:
    """metric -> (baseline numerators, denominators, now numerators, denominators): the tuned
    model's per-example scores, paired by example id (a repeated id by its occurrence). A
    metric is the ratio of sums: rates are means (denominator 1), test_loss is the NLL sum
    over the labelled-token count."""

    def by_example(rows):
        seen, out = defaultdict(int), {}
        for row in rows:
            out[(row["id"], seen[row["id"]])] = row["scores"]["tuned"]
            seen[row["id"]] += 1
        return out

    old, new = by_example(old_rows), by_example(new_rows)
    keys = sorted(old.keys() & new.keys())
    if not keys:
        return {}
    names = set.intersection(*(set(old[k]) & set(new[k]) for k in keys))
    column = lambda scores, name: np.array([scores[k][name] for k in keys], float)  # noqa: E731
    out = {
        name: (column(old, name), np.ones(len(keys)), column(new, name), np.ones(len(keys)))
        for name in sorted(names - {"loss_sum", "loss_tokens"})
    }
    if {"loss_sum", "loss_tokens"} <= names:
        out["test_loss"] = (
            column(old, "loss_sum"),
            column(old, "loss_tokens"),
            column(new, "loss_sum"),
            column(new, "loss_tokens"),
        )
    return out


def bootstrap_interval(
    old_num, old_den, new_num, new_den, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Paired bootstrap interval of (now - baseline): resample the examples with replacement,
    the same examples for both runs, and take the percentiles of the difference."""
    rng, n = np.random.default_rng(seed), len(old_num)
    diffs = []
    block = max(1, 4_000_000 // n)  # resamples at a time, bounding memory at a million examples
    for start in range(0, resamples, block):
        counts = rng.multinomial(n, np.full(n, 1 / n), size=min(block, resamples - start))
        diffs.append(counts @ new_num / (counts @ new_den) - counts @ old_num / (counts @ old_den))
    alpha = (1 - confidence) / 2
    return tuple(float(q) for q in np.quantile(np.concatenate(diffs), [alpha, 1 - alpha]))


def numbers(tree, prefix: str = "") -> dict[str, float]:
    """Every number of a metrics file by its dotted key (`tuned.exact_match`)."""
    if isinstance(tree, dict):
        return {
            k: v
            for key, value in tree.items()
            for k, v in numbers(value, f"{prefix}{key}.").items()
        }
    is_number = isinstance(tree, (int, float)) and not isinstance(tree, bool)
    return {prefix[:-1]: tree} if is_number else {}


def metrics_diff(old: dict, new: dict) -> dict:
    """{metrics file: {dotted key: {old, new}}} for every number of both runs' metrics.json,
    the shape of `dvc metrics diff` (metrics.json is a plain output, not a DVC metric)."""
    old, new = numbers(old), numbers(new)
    return {
        METRICS: {
            k: {"old": old.get(k), "new": new.get(k)} for k in sorted(old.keys() | new.keys())
        }
    }


def compare(diff: dict, rules: dict, intervals: dict[str, tuple[float, float]]) -> list[dict]:
    """One row per tuned metric and forgetting delta: old, new, change, interval, verdict."""
    lower = set(rules.get("lower_is_better") or [])
    relative = set(rules.get("relative") or [])
    tolerances = rules.get("tolerance") or {}
    rows = []
    for key, change in sorted(diff.get(METRICS, {}).items()):
        group, _, name = key.partition(".")
        checked = (group == "tuned" and name) or (group == "forgetting" and name.endswith("_delta"))
        if not checked:
            continue
        old, new = change.get("old"), change.get("new")
        tolerance = float(tolerances.get(name, tolerances.get("default", 0.0)))
        row = {"metric": key, "old": old, "new": new, "tolerance": tolerance, "status": "ok"}
        if new is None or not math.isfinite(new):  # a diverged run, or a metric it lost
            row["status"] = "REGRESSION (missing or not finite)"
            rows.append(row)
            continue
        if old is None:
            row["status"] = "new"
            rows.append(row)
            continue
        worse = (new - old) if name in lower else (old - new)
        beyond = worse > (tolerance * abs(old) if name in relative else tolerance) + 1e-12
        row["change"] = new - old
        if group == "tuned" and name in intervals:
            row["interval"] = low, high = intervals[name]
            significant = low > 0 if name in lower else high < 0  # wholly on the worse side
            if beyond:
                row["status"] = "REGRESSION" if significant else "ok (within noise)"
        elif beyond:
            row["status"] = "REGRESSION"
        rows.append(row)
    return rows


def lock_data_md5(text: str) -> dict[str, str]:
    """path -> md5 of every data file or folder a stage of dvc.lock read or wrote."""
    lock = yaml.safe_load(text) or {}
    out = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in (stage.get("deps") or []) + (stage.get("outs") or []):
            if entry["path"].startswith("data/") and "md5" in entry:
                out[entry["path"]] = entry["md5"]
    return out


def data_changes(rev: str) -> list[tuple[str, str]]:
    """(change, path) between dvc.lock at the baseline and in the workspace."""
    old_lock = subprocess.run(
        ["git", "show", f"{rev}:dvc.lock"], capture_output=True, text=True, check=False
    )
    old = lock_data_md5(old_lock.stdout if old_lock.returncode == 0 else "")
    new = lock_data_md5(Path("dvc.lock").read_text(encoding="utf-8"))
    return (
        [("modified", p) for p in sorted(old.keys() & new.keys()) if old[p] != new[p]]
        + [("added", p) for p in sorted(new.keys() - old.keys())]
        + [("removed", p) for p in sorted(old.keys() - new.keys())]
    )


def flatten(diff: dict) -> list[tuple[str, object, object]]:
    return [
        (f"{path}:{key}", c.get("old"), c.get("new"))
        for path, changes in diff.items()
        for key, c in sorted(changes.items())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--baseline",
        default=os.environ.get("BASELINE") or "HEAD",
        help="git revision or DVC experiment name (default: $BASELINE, else HEAD)",
    )
    args = parser.parse_args()
    if not Path(METRICS).exists():
        sys.exit(f"error: {METRICS} not found: run the pipeline first (make repro)")
    from dvc.repo import Repo

    rev = resolve(args.baseline)
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    rules = params.get("regression") or {}
    print(f"baseline {args.baseline} ({rev[:8]}) -> workspace")

    old_metrics = json.loads(at_revision(rev, METRICS) or "{}")
    new_metrics = json.loads(Path(METRICS).read_text(encoding="utf-8"))
    changed = data_changes(rev)
    why = not_comparable(old_metrics, new_metrics)
    if why:
        print(
            f"NOT COMPARABLE: {why}. Metrics on different test sets differ for that alone; "
            f"keep the test set fixed (data.test_path) and compare runs made on it."
        )
        for kind, path in changed:
            print(f"  {kind:<9} {path}")
        sys.exit(NOT_COMPARABLE)

    with Repo() as repo:
        params_diff = repo.params.diff(a_rev=rev).get("diff", {})
    old_rows = [json.loads(line) for line in (at_revision(rev, PREDICTIONS) or "").splitlines()]
    new_rows = [
        json.loads(line) for line in Path(PREDICTIONS).read_text(encoding="utf-8").splitlines()
    ]
    seed = int(params.get("seed", 0))
    intervals = {
        name: bootstrap_interval(
            *columns, int(rules.get("resamples", 2000)), float(rules.get("confidence", 0.95)), seed
        )
        for name, columns in paired_scores(old_rows, new_rows).items()
    }
    rows = compare(metrics_diff(old_metrics, new_metrics), rules, intervals)
    if not rows:
        sys.exit(f"error: no tuned metrics to compare in {METRICS} at {args.baseline} ({rev[:8]})")

    level = f"{float(rules.get('confidence', 0.95)):.0%}"
    test_set = new_metrics["test_set"]
    print(
        f"test set: {test_set['examples']} examples, sha256 {test_set['sha256'][:12]} "
        f"(unchanged); "
        f"intervals: paired bootstrap, {level}, {rules.get('resamples', 2000)} resamples"
    )
    print(
        f"{'metric':<30} {'baseline':>9} {'now':>9} {'change':>9} {level + ' interval':>20} "
        f"{'tolerance':>9}  status"
    )
    fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for r in rows:
        change = f"{r['change']:+.4f}" if "change" in r else ""
        interval = "[{:+.4f}, {:+.4f}]".format(*r["interval"]) if "interval" in r else "-"
        print(
            f"{r['metric']:<30} {fmt(r['old']):>9} {fmt(r['new']):>9} {change:>9} "
            f"{interval:>20} {r['tolerance']:>9}  {r['status']}"
        )

    print(
        "\ndata changed since the baseline (md5 in dvc.lock):"
        if changed
        else "\ndata: unchanged since the baseline"
    )
    for kind, path in changed:
        print(f"  {kind:<9} {path}")
    params_changed = flatten(params_diff)
    print("params changed:" if params_changed else "params: unchanged")
    for key, old, new in params_changed:
        print(f"  {key}: {old!r} -> {new!r}")

    regressions = [r["metric"] for r in rows if r["status"].startswith("REGRESSION")]
    if regressions:
        print(f"\nregression (significant and beyond tolerance): {', '.join(regressions)}")
        sys.exit(1)
    print("\nno regression: no metric dropped significantly by more than its tolerance")


if __name__ == "__main__":
    main()
