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

import json
import tempfile
from collections import Counter
from dataclasses import dataclass

import numpy as np

from stages.common import paths, tracking
from stages.common.config import load_params, run_stage
from stages.common.engine import Spool, chunked, iter_lines, map_chunks
from stages.common.files import jsonl_writer, md5_path, text_writer, write_json
from stages.common.kinds import answer_key, request_text
from stages.common.similarity import UnionFind, signatures, similar_pairs, text_digests

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
    """1. read every row once, a chunk at a time (worker processes), keeping small arrays per
    row (id, hashes of request and answer, MinHash signature on disk); 2. exact duplicates of
    the whole record; 3. clusters of the same request (equal or near-equal by MinHash),
    resolved by dedup.conflict_policy; 4. write the kept rows (the fixed evaluation sets pass
    untouched), the removed ones with their reason, the report."""
    params = load_params()
    cfg, seed = params["dedup"], int(params["seed"])
    engine = params["data"]["engine"]  # where the per-row work and the LSH buckets run

    with tracking.stage_run("dedup", params, ["dedup"], {"valid": md5_path(INPUT)}) as run:
        with Spool(OUTPUT.parent) as spool:
            rows = survey_rows(cfg, seed, spool, engine)
            removed = exact_duplicates(rows.ids)  # index -> (reason, index it duplicates)
            remaining = np.array([i for i in range(len(rows.ids)) if i not in removed])
            clusters = same_request_clusters(
                rows.requests, rows.signatures, float(cfg["threshold"]), remaining, engine
            )
            resolve_clusters(clusters, rows, remaining, cfg, removed)
            examples = write_rows(rows, removed, clusters[:10], remaining)
        by_reason = Counter(reason for reason, _ in removed.values())
        rows_out = rows.n_rows - len(removed)
        report = {
            "rows_in": rows.n_rows,
            "fixed_rows_passed": dict(sorted(rows.fixed.items())),
            "rows_out": rows_out,
            "rows_removed": len(removed),
            "removed_by_reason": dict(sorted(by_reason.items())),
            "clusters": len(clusters),
            "conflict_policy": cfg["conflict_policy"],
            "example_clusters": examples,
        }
        assert report["rows_in"] == report["rows_out"] + report["rows_removed"]
        write_json(REPORT, report)
        run.summary.update(
            {
                "dedup/rows_in": rows.n_rows,
                "dedup/rows_out": rows_out,
                **{f"dedup/removed/{k}": v for k, v in by_reason.items()},
            }
        )
        print(f"dedup: {rows.n_rows} in, {rows_out} kept, removed {dict(by_reason)}")


# --- the per-record work: engine.map_chunks runs it on each chunk, in worker processes ------

_WORK: dict = {}


def setup_worker(settings: dict) -> None:
    _WORK.update(settings)


def measure_chunk(lines: list[str]) -> dict:
    """The small per-row values of a chunk of JSONL lines: for the rows of a fixed set, their
    set; for the others, id, line, hashes of the request and the answer, MinHash signature."""
    records = [json.loads(line) for line in lines]
    fixed = [r.get("fixed_split") for r in records]
    pool = [r for r in records if not r.get("fixed_split")]
    texts = [request_text(r) for r in pool]
    return {
        "fixed": fixed,
        "ids": np.array([int(r["id"], 16) for r in pool], dtype=np.uint64),
        "lines": np.array([r["line"] for r in pool], dtype=np.int64),
        "requests": text_digests(texts),
        "answers": text_digests([answer_key(r) for r in pool]),
        "signatures": signatures(texts, _WORK["shingle_size"], _WORK["num_perm"], _WORK["seed"]),
    }


# --- the steps of main ----------------------------------------------------------------------


@dataclass
class Rows:
    """Per pool row (the rows not in a fixed set), in input order: small arrays only."""

    n_rows: int  # every row, the fixed sets' included
    fixed: Counter  # fixed set -> rows passed through
    fixed_rows: list[bool]  # per input row: in a fixed set
    ids: np.ndarray  # record id as uint64 (ids are 16 hex digits)
    lines: np.ndarray
    requests: np.ndarray  # digests of request_text
    answers: np.ndarray  # digests of answer_key
    signatures: np.ndarray  # (rows, num_perm) uint32, memory-mapped from the spool


def survey_rows(cfg: dict, seed: int, spool: Spool, engine: str = "local") -> Rows:
    settings = {"shingle_size": cfg["shingle_size"], "num_perm": cfg["num_perm"], "seed": seed}
    parts: dict[str, list] = {"ids": [], "lines": [], "requests": [], "answers": []}
    fixed: Counter = Counter()
    n_rows = 0
    fixed_rows: list[bool] = []
    signatures_file = spool.rows_file("signatures", int(cfg["num_perm"]))
    chunks = chunked(iter_lines(INPUT))
    for chunk in map_chunks(measure_chunk, chunks, setup_worker, (settings,), engine):
        n_rows += len(chunk["fixed"])
        fixed.update(name for name in chunk["fixed"] if name)
        fixed_rows += [bool(name) for name in chunk["fixed"]]
        for key, values in parts.items():
            values.append(chunk[key])
        signatures_file.append(chunk["signatures"])
    concat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    sigs = signatures_file.read()
    return Rows(n_rows=n_rows, fixed=fixed, fixed_rows=fixed_rows, signatures=sigs, **concat)


def exact_duplicates(ids: np.ndarray) -> dict[int, tuple[str, int]]:
    """Rows whose whole content repeats an earlier row's (ids hash the normalised content)."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    first_of = first[inverse]
    return {
        int(i): ("exact_duplicate", int(first_of[i]))
        for i in np.flatnonzero(first_of != np.arange(len(ids)))
    }


def same_request_clusters(
    requests: np.ndarray, signatures, threshold: float, rows: np.ndarray, engine: str = "local"
) -> list[list[int]]:
    """Groups (positions in `rows`) of two or more requests that are equal once normalised
    (equal digests), or near-equal by MinHash Jaccard >= dedup.threshold."""
    uf = UnionFind(len(rows))
    by_prompt: dict[bytes, int] = {}
    for k, digest in enumerate(requests[rows].tolist()):
        uf.union(by_prompt.setdefault(digest, k), k)
    del by_prompt
    uf.union_pairs(similar_pairs(signatures, threshold, rows=rows, engine=engine))
    return [members for members in uf.clusters().values() if len(members) > 1]


def resolve_clusters(clusters, rows: Rows, remaining, cfg, removed) -> None:
    """Keep or drop the rows of each cluster by dedup.conflict_policy (into `removed`, with the
    row each duplicates)."""
    answers = rows.answers[remaining]
    for members in clusters:
        kept, dropped = resolve_cluster(
            members, {k: answers[k].tobytes() for k in members}, cfg["conflict_policy"]
        )
        anchor = remaining[kept[0]] if kept else remaining[members[0]]
        for k, reason in dropped.items():
            removed[int(remaining[k])] = (reason, int(anchor))


def write_rows(rows: Rows, removed, example_clusters, remaining) -> list[dict]:
    """Second pass: the kept rows of the pool in input order, then the fixed sets' rows (from
    the spool); the removed rows with the id and line they duplicate; the first ten clusters
    as examples for the report."""
    wanted = {int(remaining[k]) for members in example_clusters for k in members[:3]}
    texts: dict[int, str] = {}
    with (
        text_writer(OUTPUT) as keep,
        jsonl_writer(REMOVED) as drop,
        tempfile.TemporaryFile("w+", encoding="utf-8", dir=OUTPUT.parent) as fixed_rows,
    ):
        i = 0  # position in the pool
        # lines are validate's, written as they would be here: a kept row is copied as it is
        for line, fixed in zip(iter_lines(INPUT), rows.fixed_rows):
            if fixed:
                fixed_rows.write(line)
                continue
            if i in wanted or i in removed:
                record = json.loads(line)
                texts[i] = request_text(record)
            if i in removed:
                reason, j = removed[i]
                drop(
                    {
                        **record,
                        "reason": reason,
                        "duplicate_of": f"{int(rows.ids[j]):016x}",
                        "duplicate_of_line": int(rows.lines[j]),
                    }
                )
            else:
                keep.write(line)
            i += 1
        fixed_rows.seek(0)
        keep.writelines(fixed_rows)
    examples = []
    for members in example_clusters:
        kept = [k for k in members if int(remaining[k]) not in removed]
        examples.append(
            {
                "kept": [int(rows.lines[remaining[k]]) for k in kept],
                "removed": {
                    int(rows.lines[remaining[k]]): removed[int(remaining[k])][0]
                    for k in members
                    if int(remaining[k]) in removed
                },
                "prompts": [texts[int(remaining[k])][:160] for k in members[:3]],
            }
        )
    return examples


if __name__ == "__main__":
    run_stage(main)
