"""Stage dedup: remove exact and near-duplicate records, resolve conflicting answers.

1. Exact duplicates: the same conversation after normalisation (NFKC, case, whitespace);
   the earliest row is kept.
2. Clusters of the same request: prompts that are equal after normalisation or near-equal by
   MinHash LSH (datasketch) on word shingles.
   - all answers agree -> keep the earliest row, drop the rest as `near_duplicate`;
   - answers differ   -> a conflict, resolved by `dedup.conflict_policy`:
     drop_all (default: a label you cannot trust teaches noise), majority, or first.
Rows of the fixed evaluation sets (data.test_path, data.validation_path) pass through as they
are: they are scored as curated, and the split stage removes training rows too close to them.

Outputs: data/interim/dedup.jsonl, data/interim/dedup_removed.jsonl (each removed row with its
reason and the id it duplicates), reports/dedup.json.
"""

from __future__ import annotations

from collections import Counter

from stages.common import paths, tracking
from stages.common.config import load_params, run_stage
from stages.common.files import md5_path, read_jsonl, write_json, write_jsonl
from stages.common.kinds import answer_key, request_text
from stages.common.similarity import UnionFind, near_duplicate_pairs

INPUT, OUTPUT, REMOVED = paths.VALID, paths.DEDUP, paths.DEDUP_REMOVED
REPORT = paths.stage_report("dedup")


def resolve_cluster(members: list[int], answers: list[str], policy: str):
    """(kept indices, {removed index: reason}) for one cluster of the same request."""
    distinct = Counter(answers[i] for i in members)
    if len(distinct) == 1:
        return [members[0]], dict.fromkeys(members[1:], "near_duplicate")
    if policy == "first":
        keep = members[0]
    elif policy == "majority":
        (top, n), *rest = distinct.most_common()
        if rest and rest[0][1] == n:  # a tie has no majority: nothing to trust
            return [], dict.fromkeys(members, "conflicting_answers")
        keep = next(i for i in members if answers[i] == top)
    else:
        return [], dict.fromkeys(members, "conflicting_answers")
    return [keep], {i: "conflicting_answers" for i in members if i != keep}


def main() -> None:
    """1. exact duplicates of the whole record; 2. clusters of the same request (equal or
    near-equal by MinHash), resolved by dedup.conflict_policy; 3. write the kept rows (the
    fixed evaluation sets pass untouched), the removed ones with their reason, the report."""
    params = load_params()
    cfg, seed = params["dedup"], int(params["seed"])

    with tracking.stage_run("dedup", params, ["dedup"], {"valid": md5_path(INPUT)}) as run:
        everything = read_jsonl(INPUT)
        records = [r for r in everything if not r.get("fixed_split")]
        fixed = [r for r in everything if r.get("fixed_split")]
        removed = exact_duplicates(records)  # index -> (reason, index it duplicates)
        remaining = [i for i in range(len(records)) if i not in removed]
        texts = [request_text(records[i]) for i in remaining]
        clusters = same_request_clusters(texts, cfg, seed)
        examples = resolve_clusters(clusters, records, remaining, texts, cfg, removed)
        kept_records = [r for i, r in enumerate(records) if i not in removed] + fixed
        removed_rows = [
            {
                **records[i],
                "reason": reason,
                "duplicate_of": records[j]["id"],
                "duplicate_of_line": records[j]["line"],
            }
            for i, (reason, j) in sorted(removed.items())
        ]
        write_jsonl(OUTPUT, kept_records)
        write_jsonl(REMOVED, removed_rows)

        by_reason = Counter(r["reason"] for r in removed_rows)
        report = {
            "rows_in": len(everything),
            "fixed_rows_passed": dict(sorted(Counter(r["fixed_split"] for r in fixed).items())),
            "rows_out": len(kept_records),
            "rows_removed": len(removed_rows),
            "removed_by_reason": dict(sorted(by_reason.items())),
            "clusters": len(clusters),
            "conflict_policy": cfg["conflict_policy"],
            "example_clusters": examples,
        }
        assert report["rows_in"] == report["rows_out"] + report["rows_removed"]
        write_json(REPORT, report)
        run.summary.update(
            {
                "dedup/rows_in": len(everything),
                "dedup/rows_out": len(kept_records),
                **{f"dedup/removed/{k}": v for k, v in by_reason.items()},
            }
        )
        print(f"dedup: {len(everything)} in, {len(kept_records)} kept, removed {dict(by_reason)}")


# --- the steps of main ----------------------------------------------------------------------


def resolve_clusters(clusters, records, remaining, texts, cfg, removed) -> list[dict]:
    """Keep or drop the rows of each cluster by dedup.conflict_policy (into `removed`, with the
    row each duplicates); the first ten clusters as examples for the report."""
    answers = [answer_key(records[i]) for i in remaining]
    examples = []
    for members in clusters:
        kept, dropped = resolve_cluster(members, answers, cfg["conflict_policy"])
        anchor = remaining[kept[0]] if kept else remaining[members[0]]
        for k, reason in dropped.items():
            removed[remaining[k]] = (reason, anchor)
        if len(examples) < 10:
            examples.append(
                {
                    "kept": [records[remaining[k]]["line"] for k in kept],
                    "removed": {
                        records[remaining[k]]["line"]: reason for k, reason in dropped.items()
                    },
                    "prompts": [texts[k][:160] for k in members[:3]],
                }
            )
    return examples


def exact_duplicates(records: list[dict]) -> dict[int, tuple[str, int]]:
    """Rows whose whole content repeats an earlier row's (ids hash the normalised content)."""
    removed: dict[int, tuple[str, int]] = {}
    first_of: dict[str, int] = {}
    for i, r in enumerate(records):
        if r["id"] in first_of:
            removed[i] = ("exact_duplicate", first_of[r["id"]])
        else:
            first_of[r["id"]] = i
    return removed


def same_request_clusters(texts: list[str], cfg: dict, seed: int) -> list[list[int]]:
    """Groups of two or more requests that are equal once normalised, or near-equal by MinHash
    Jaccard >= dedup.threshold."""
    uf = UnionFind(len(texts))
    by_prompt: dict[str, int] = {}
    for k, text in enumerate(texts):
        uf.union(by_prompt.setdefault(text, k), k)
    for a, b in near_duplicate_pairs(
        texts, cfg["shingle_size"], cfg["num_perm"], float(cfg["threshold"]), seed
    ):
        uf.union(a, b)
    return [members for members in uf.clusters().values() if len(members) > 1]


if __name__ == "__main__":
    run_stage(main)
