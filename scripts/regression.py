"""Regression check: this run's metrics against a baseline, with the data and config changes
that came with them (`make regression`).

    python scripts/regression.py                    # baseline: the last commit (HEAD)
    python scripts/regression.py --baseline v1.2    # a git revision (tag, branch, sha)
    python scripts/regression.py --baseline lr-2e-3 # a DVC experiment name

Compares the tuned model's metrics in reports/metrics.json (the workspace) with the baseline's
through DVC's own diffs (`dvc metrics diff`, `dvc params diff`), prints one table,
and exits 1 when a metric got worse by more than its tolerance (`regression` in params.yaml:
absolute for rates and the forgetting deltas, relative for loss and perplexity). Then lists what changed underneath:
the data (every data/ dep and out of dvc.lock whose md5 differs) and the params.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

METRICS = "reports/metrics.json"


def experiment_rev(name: str) -> str | None:
    """The commit of a DVC experiment with this name, if there is one."""
    out = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", "-A"],
                         capture_output=True, text=True)
    if out.returncode:
        return None
    try:
        shown = json.loads(out.stdout[out.stdout.index("["):])
    except ValueError:
        return None
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if exp.get("name") == name:
                return exp["revs"][0]["rev"]
    return None


def resolve(baseline: str) -> str:
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{baseline}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode == 0:
        return found.stdout.strip()
    rev = experiment_rev(baseline)
    if rev is None:
        sys.exit(f"error: baseline {baseline!r} is neither a git revision nor a DVC experiment")
    return rev


def compare(metrics_diff: dict, rules: dict) -> list[dict]:
    """One row per tuned metric: old, new, change and whether it regressed."""
    lower = set(rules.get("lower_is_better") or [])
    relative = set(rules.get("relative") or [])
    tolerances = rules.get("tolerance") or {}
    rows = []
    for key, change in sorted(metrics_diff.get(METRICS, {}).items()):
        group, _, name = key.partition(".")
        checked = (group == "tuned" and name) or (group == "forgetting"
                                                   and name.endswith("_delta"))
        if not checked:
            continue
        old, new = change.get("old"), change.get("new")
        tolerance = float(tolerances.get(name, tolerances.get("default", 0.0)))
        row = {"metric": key, "old": old, "new": new, "tolerance": tolerance, "status": "ok"}
        if old is None or new is None:
            row["status"] = "new" if old is None else "gone"
        else:
            worse = (new - old) if name in lower else (old - new)
            limit = tolerance * abs(old) if name in relative else tolerance
            row["change"] = new - old
            if worse > limit + 1e-12:
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
    old_lock = subprocess.run(["git", "show", f"{rev}:dvc.lock"], capture_output=True, text=True)
    old = lock_data_md5(old_lock.stdout if old_lock.returncode == 0 else "")
    new = lock_data_md5(Path("dvc.lock").read_text(encoding="utf-8"))
    return ([("modified", p) for p in sorted(old.keys() & new.keys()) if old[p] != new[p]]
            + [("added", p) for p in sorted(new.keys() - old.keys())]
            + [("removed", p) for p in sorted(old.keys() - new.keys())])


def flatten(diff: dict) -> list[tuple[str, object, object]]:
    return [(f"{path}:{key}", c.get("old"), c.get("new"))
            for path, changes in diff.items() for key, c in sorted(changes.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="HEAD",
                        help="git revision or DVC experiment name (default: HEAD)")
    args = parser.parse_args()
    if not Path(METRICS).exists():
        sys.exit(f"error: {METRICS} not found: run the pipeline first (make repro)")
    from dvc.repo import Repo

    rev = resolve(args.baseline)
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    rules = params.get("regression") or {}
    with Repo() as repo:
        metrics_diff = repo.metrics.diff(a_rev=rev, all=True).get("diff", {})
        params_diff = repo.params.diff(a_rev=rev).get("diff", {})
    rows = compare(metrics_diff, rules)
    if not rows:
        sys.exit(f"error: no tuned metrics to compare in {METRICS} at {args.baseline} ({rev[:8]})")

    print(f"baseline {args.baseline} ({rev[:8]}) -> workspace")
    print(f"{'metric':<34} {'baseline':>10} {'now':>10} {'change':>9} {'tolerance':>9}  status")
    for r in rows:
        change = f"{r['change']:+.4f}" if "change" in r else ""
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-")
        print(f"{r['metric']:<34} {fmt(r['old']):>10} {fmt(r['new']):>10} {change:>9} "
              f"{r['tolerance']:>9}  {r['status']}")

    changed = data_changes(rev)
    print("\ndata changed since the baseline (md5 in dvc.lock):" if changed
          else "\ndata: unchanged since the baseline")
    for kind, path in changed:
        print(f"  {kind:<9} {path}")
    params_changed = flatten(params_diff)
    print("params changed:" if params_changed else "params: unchanged")
    for key, old, new in params_changed:
        print(f"  {key}: {old!r} -> {new!r}")

    regressions = [r["metric"] for r in rows if r["status"] == "REGRESSION"]
    if regressions:
        print(f"\nregression beyond tolerance: {', '.join(regressions)}")
        sys.exit(1)
    print("\nno regression beyond tolerance")


if __name__ == "__main__":
    main()
