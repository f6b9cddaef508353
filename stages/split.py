"""Stage split: seeded, stratified, group-aware train / validation / test split; leakage check.

1. Groups: records whose requests are near-alike (MinHash Jaccard >= split.group_threshold,
   looser than dedup's) form one group, and a group always lands in one split, so paraphrases
   of a test ticket never sit in train.
2. Stratified by the task's label fields: within each stratum, groups are shuffled with the
   seed and fill test, then validation, up to each split's share of the stratum's rows
   (largest-remainder rounding); a group too big for the room left goes to train, and so
   does the rest. Same seed, same input -> byte-identical files.
   Fixed evaluation sets (data.test_path, data.validation_path; rows tagged `fixed_split` by
   validate) are not carved: they are that split, whole, and the other fractions share the
   rest. A training row in a group with a fixed row (same or near-alike request) is removed
   (duplicate_of_test, near_duplicate_of_test, ...), and so is one whose n-grams mostly occur
   in a fixed set (leak_of_test): whatever data is added, the fixed sets never move.
3. Leakage: each test row's request (prompt without system message; raw text as is) is cut
   into word n-grams (13; 8 under split.leakage.short_record_words words) and looked up in
   the train requests; a row is flagged when at least split.leakage.min_overlap of its
   n-grams occur there, or when its request equals a train request. Optionally every split is
   checked against an external evaluation file too.
   Policy `report` lists them; `remove` drops them (written down in the removed file).
4. Class balance per split; optional rebalancing of train (cap or upsample).
5. Replay (data.replay): general chat records mixed into train, `fraction` of it, so tuning
   keeps general ability; a replay row too close to the test split or the forgetting probe
   (eval.general_path) is left out and written down. Replay rows carry `"replay": true` and
   stay out of the task rows' reconciliation and class balance.

Outputs: data/processed/{train,validation,test}.jsonl, data/interim/split_removed.jsonl,
reports/split.json.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, defaultdict
from pathlib import Path

from stages.common import paths, tracking
from stages.common.config import StageError, load_params, require_dependency, run_stage
from stages.common.files import md5_path, read_jsonl, write_json, write_jsonl
from stages.common.kinds import answer_of, canonical, kind_of, request_text
from stages.common.records import read_file, record_id, set_hash
from stages.common.similarity import UnionFind, near_duplicate_pairs, ngrams
from stages.common.task import Task

INPUT, OUT_DIR, REMOVED = paths.DEDUP, paths.PROCESSED, paths.SPLIT_REMOVED
REPORT = paths.stage_report("split")
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


def stratified_group_split(
    strata: list[str], groups: list[list[int]], fractions: dict[str, float], seed: int
) -> list[str]:
    """The split name of each row; every group goes whole to one split."""
    by_stratum: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups:
        by_stratum[strata[members[0]]].append(members)  # a group follows its first row's label
    sizes = {s: sum(len(g) for g in gs) for s, gs in by_stratum.items()}
    test_q = quotas(sizes, fractions["test"])
    left = {s: sizes[s] - test_q[s] for s in sizes}
    val_q = quotas(left, fractions["validation"] / max(1e-9, 1 - fractions["test"]))
    assignment = [""] * len(strata)
    for s, stratum_groups in sorted(by_stratum.items()):
        # per-stratum stream: adding a stratum does not reshuffle the others
        salt = int(hashlib.sha1(s.encode()).hexdigest()[:8], 16)
        random.Random(seed * 1_000_003 + salt).shuffle(stratum_groups)
        room = {"test": test_q[s], "validation": val_q[s]}
        for members in stratum_groups:
            # a group goes where it fits whole; one bigger than the room left goes to train
            name = next((n for n in ("test", "validation") if len(members) <= room[n]), "train")
            if name != "train":
                room[name] -= len(members)
            for i in members:
                assignment[i] = name
    return assignment


def similar_groups(records: list[dict], cfg: dict, seed: int) -> list[list[int]]:
    uf = UnionFind(len(records))
    texts = [request_text(r) for r in records]
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        uf.union(first.setdefault(text, i), i)
    if cfg["group_threshold"]:
        for a, b in near_duplicate_pairs(texts, 3, 128, float(cfg["group_threshold"]), seed):
            uf.union(a, b)
    return sorted(uf.clusters().values())


class NgramIndex:
    """Word n-grams of reference records, for the share of a row's n-grams found there."""

    def __init__(self, records: list[dict], short_words: int, sizes: set[int]):
        self.short_words = short_words
        # n-gram -> the first reference row that has it (enough to name one match)
        self.first: dict[int, dict[str, int]] = {n: {} for n in sizes}
        for k, r in enumerate(records):
            text = request_text(r)
            for n, index in self.first.items():
                for gram in ngrams(text, n):
                    index.setdefault(gram, k)
        self.requests = {request_text(r): k for k, r in enumerate(records) if "text" not in r}

    def size_for(self, text: str) -> int:
        return 8 if len(text.split()) < self.short_words else 13

    def overlap(self, record: dict) -> tuple[float, int | None]:
        """(share of the row's n-grams found in the reference, a reference row that has most)."""
        text = request_text(record)
        if "text" not in record and text in self.requests:
            return 1.0, self.requests[text]
        index = self.first[self.size_for(text)]
        grams = ngrams(text, self.size_for(text)) or {text}
        hits = Counter(index[g] for g in grams if g in index)
        # ties go to the first reference row: set order varies with the process's hash seed
        best = min(hits, key=lambda k: (-hits[k], k)) if hits else None
        return sum(hits.values()) / len(grams), best


def external_records(path: str, key: str) -> list[dict]:
    """Rows of a set kept outside data.path (any kind, any readable format), named by `key`."""
    out = []
    for row in read_file(Path(path)):
        kind = kind_of(row["obj"])
        if kind:
            fields = canonical(kind, row["obj"])[0]
            out.append({"id": record_id(fields), **fields, "source": path, "line": row["line"]})
    if not out:
        raise StageError(f"{key}: {path}: no readable records")
    return out


def main() -> None:
    """1. group near-alike requests; 2. set aside rows that copy a fixed evaluation set;
    3. carve the splits; 4. check leakage; 5. rebalance train; 6. mix the replay rows into
    train; 7. write the splits, the removed rows and the report."""
    params = load_params()
    cfg, leak_cfg = params["split"], params["split"]["leakage"]
    task, seed = Task.from_params(params), int(params["seed"])
    replay_cfg = params["data"]["replay"]
    inputs = {"dedup": md5_path(INPUT)}
    if replay_cfg["path"] and replay_cfg["fraction"]:
        require_dependency("split", "data.replay.path", replay_cfg["path"])
        inputs["replay"] = md5_path(Path(replay_cfg["path"]))
    if leak_cfg["external_eval"]:
        require_dependency("split", "split.leakage.external_eval", leak_cfg["external_eval"])
        inputs["external_eval"] = md5_path(Path(leak_cfg["external_eval"]))

    with tracking.stage_run("split", params, ["split", "task"], inputs) as run:
        records = read_jsonl(INPUT)
        fixed = {
            name: [i for i, r in enumerate(records) if r.get("fixed_split") == name]
            for name in ("validation", "test")
        }
        if len(records) - sum(map(len, fixed.values())) < len(SPLITS):
            raise StageError(f"{INPUT}: {len(records)} records are too few to split")
        strata = [task.stratum(answer_of(r)) if "text" not in r else "" for r in records]
        groups = similar_groups(records, cfg, seed)
        removed = copies_of_fixed_sets(records, groups)  # row -> why it was removed
        fractions = {name: float(cfg[name]) for name in SPLITS}
        assignment = carve(records, groups, strata, fixed, removed, fractions, seed)
        parts = {name: [i for i, a in enumerate(assignment) if a == name] for name in SPLITS}
        for i in removed:
            assignment[i] = "train"  # where it would have gone: the fixed sets hold no room
        leaks = [
            *leaks_into_fixed_sets(records, fixed, parts, assignment, removed, leak_cfg),
            *leaks_of_carved_test(records, fixed, parts, removed, leak_cfg),
            *leaks_of_external_eval(records, assignment, removed, leak_cfg),
        ]
        train_rows = [i for i in parts["train"] if i not in removed]
        added = rebalance_train(train_rows, strata, removed, cfg, task, seed)
        guarded = {"test": [records[i] for i in parts["test"] if i not in removed]}
        if params["eval"]["general_path"]:
            path = params["eval"]["general_path"]
            guarded["general_probe"] = external_records(path, "eval.general_path")
        replay, replay_left_out, replay_report = replay_rows(
            replay_cfg, records, len(train_rows) + len(added), guarded, leak_cfg, seed
        )

        outputs = write_splits(records, parts, assignment, removed, added, replay, replay_left_out)
        report = build_report(
            records, outputs, removed, added, fixed, groups, leaks, params, task, fractions
        )
        report["replay"] = replay_report
        write_json(REPORT, report)
        run.summary.update({f"split/{n}": len(rows) for n, rows in outputs.items()})
        run.summary["split/leaks_flagged"] = len(leaks)
        print(
            f"split: {report['sizes']}, {report['groups']['multi_row']} groups of near-alike "
            f"requests kept together, leakage flagged {len(leaks)}, removed "
            f"{report['removed_by_reason'] or 'nothing'}"
        )


# --- the steps of main ------------------------------------------------------------------------


def copies_of_fixed_sets(records: list[dict], groups: list[list[int]]) -> dict[int, dict]:
    """Fixed evaluation sets stay whole: a training row that duplicates or paraphrases one of
    their rows (same group) is removed."""
    removed: dict[int, dict] = {}
    for members in groups:
        anchor = next((i for i in members if records[i].get("fixed_split")), None)
        for i in members if anchor is not None else []:
            if not records[i].get("fixed_split"):
                exact = request_text(records[i]) == request_text(records[anchor])
                removed[i] = {
                    "reason": ("duplicate_of_" if exact else "near_duplicate_of_")
                    + records[anchor]["fixed_split"],
                    "matches_line": records[anchor]["line"],
                }
    return removed


def carve(records, groups, strata, fixed, removed, fractions, seed) -> list[str]:
    """The split of each row: a fixed set's rows are that split; the other rows are carved by
    stratum and group, the carved splits sharing the fractions of the splits not fixed."""
    shares = {n: 0.0 if fixed.get(n) else f for n, f in fractions.items()}
    shares = {n: f / (sum(shares.values()) or 1) for n, f in shares.items()}
    pool_groups = [
        g for g in groups if not any(records[i].get("fixed_split") or i in removed for i in g)
    ]
    assignment = stratified_group_split(strata, pool_groups, shares, seed)
    for name, rows in fixed.items():
        for i in rows:
            assignment[i] = name
    for i, record in enumerate(records):
        if record.get("fixed_split") == "train":  # a reviewed correction, moved into train
            assignment[i] = "train"
    return assignment


def leak_entry(record: dict, split: str, share: float, against: str, matches_line) -> dict:
    return {
        "split": split,
        "id": record["id"],
        "line": record["line"],
        "overlap": round(share, 3),
        "against": against,
        "matches_line": matches_line,
    }


def leaks_into_fixed_sets(records, fixed, parts, assignment, removed, leak_cfg) -> list[dict]:
    """A carved row sharing most of its n-grams with a fixed set is removed, whatever the
    policy: the fixed sets never move."""
    min_overlap, short = float(leak_cfg["min_overlap"]), int(leak_cfg["short_record_words"])
    leaks = []
    for name, rows in fixed.items():
        if not rows:
            continue
        index = NgramIndex([records[i] for i in rows], short, {8, 13})
        for i in [i for n in SPLITS if not fixed.get(n) for i in parts[n]]:
            share, match = index.overlap(records[i])
            if share >= min_overlap and i not in removed:
                line = records[rows[match]]["line"]
                removed[i] = {"reason": f"leak_of_{name}", "matches_line": line}
                leaks.append(leak_entry(records[i], assignment[i], share, f"fixed {name}", line))
    return leaks


def leaks_of_carved_test(records, fixed, parts, removed, leak_cfg) -> list[dict]:
    """Each row of a carved test split against train; `remove` drops the leaking test rows."""
    min_overlap, short = float(leak_cfg["min_overlap"]), int(leak_cfg["short_record_words"])
    carved_test = [] if fixed["test"] else parts["test"]
    sizes = {8 if len(request_text(records[i]).split()) < short else 13 for i in carved_test}
    kept_train = [i for i in parts["train"] if i not in removed]
    train_index = NgramIndex([records[i] for i in kept_train], short, sizes)
    leaks = []
    for i in carved_test:
        share, match = train_index.overlap(records[i])
        if share >= min_overlap:
            line = records[kept_train[match]]["line"]
            leaks.append(leak_entry(records[i], "test", share, "train", line))
            if leak_cfg["policy"] == "remove":
                removed[i] = {"reason": "leak_test_train", "matches_line": line}
    return leaks


def leaks_of_external_eval(records, assignment, removed, leak_cfg) -> list[dict]:
    """Every row against split.leakage.external_eval, when set."""
    if not leak_cfg["external_eval"]:
        return []
    min_overlap, short = float(leak_cfg["min_overlap"]), int(leak_cfg["short_record_words"])
    external = external_records(leak_cfg["external_eval"], "split.leakage.external_eval")
    external_index = NgramIndex(external, short, {8, 13})
    leaks = []
    for i, record in enumerate(records):
        share, match = external_index.overlap(record)
        if share >= min_overlap:
            line = external[match]["line"]
            leaks.append(leak_entry(record, assignment[i], share, "external_eval", line))
            if leak_cfg["policy"] == "remove":
                removed[i] = {"reason": "leak_external_eval", "matches_line": line}
    return leaks


def rebalance_train(train_rows, strata, removed, cfg, task, seed) -> list[int]:
    """split.rebalance by stratum: `cap` removes rows above the cap, `upsample` returns the
    rows to repeat up to it."""
    added: list[int] = []
    if cfg["rebalance"] == "none" or not task.stratify_by:
        return added
    by_stratum: dict[str, list[int]] = defaultdict(list)
    for i in train_rows:
        by_stratum[strata[i]].append(i)
    cap = int(cfg["rebalance_cap"] or max(len(v) for v in by_stratum.values()))
    rng = random.Random(seed)
    for _, rows in sorted(by_stratum.items()):
        if cfg["rebalance"] == "cap" and len(rows) > cap:
            for i in sorted(rng.sample(rows, len(rows) - cap)):
                removed[i] = {"reason": "rebalance_cap"}
        elif cfg["rebalance"] == "upsample" and len(rows) < cap:
            added += [rows[k % len(rows)] for k in range(cap - len(rows))]
    return added


def replay_rows(
    replay_cfg, records, n_train, guarded, leak_cfg, seed
) -> tuple[list[dict], list[dict], dict]:
    """data.replay: general chat records for train, `fraction` of it after mixing, taken in a
    seeded order (the set repeats whole when it is smaller than asked). A row that shares most
    of its n-grams with a guarded set (the test split, the forgetting probe) is left out: the
    probe would no longer measure forgetting. Returns (rows to mix, rows left out, report)."""
    fraction = float(replay_cfg["fraction"])
    if not fraction or not replay_cfg["path"]:
        return [], [], {"fraction": 0.0, "rows_mixed": 0}
    path = replay_cfg["path"]
    if any("messages" not in r for r in records):
        raise StageError(
            f"data.replay: {path} holds chat records, which mix only into chat training; this "
            "data set is not chat records: set data.replay.fraction=0"
        )
    rows = external_records(path, "data.replay.path")
    for row in rows:
        if "messages" not in row:
            raise StageError(f"data.replay.path: {path}: line {row['line']}: not a chat record")
    min_overlap, short = float(leak_cfg["min_overlap"]), int(leak_cfg["short_record_words"])
    indexes = {name: NgramIndex(rows_, short, {8, 13}) for name, rows_ in guarded.items()}
    kept, left_out = [], []
    for row in rows:
        for name, index in indexes.items():
            share, match = index.overlap(row)
            if share >= min_overlap:
                line = guarded[name][match]["line"]
                left_out.append({**row, "reason": f"replay_close_to_{name}", "matches_line": line})
                break
        else:
            kept.append(row)
    if not kept:
        raise StageError(f"data.replay.path: {path}: every row is too close to {list(guarded)}")
    random.Random(seed).shuffle(kept)
    wanted = round(fraction / (1 - fraction) * n_train)
    mixed = [{**kept[k % len(kept)], "replay": True} for k in range(wanted)]
    report = {
        "path": path,
        "fraction": fraction,
        "rows_read": len(rows),
        "rows_left_out": len(left_out),  # too close to a guarded set (in split_removed.jsonl)
        "rows_mixed": len(mixed),
        "rows_repeated": max(0, wanted - len(kept)),
        "set_hash": set_hash(kept),
    }
    assert report["rows_read"] == len(kept) + report["rows_left_out"]
    return mixed, left_out, report


def write_splits(
    records, parts, assignment, removed, added, replay, replay_left_out
) -> dict[str, list[dict]]:
    """The rows of each split (train with its upsampled repeats and its replay rows), and the
    removed rows with their split and reason (replay rows left out under split "replay")."""
    outputs = {name: [records[i] for i in rows if i not in removed] for name, rows in parts.items()}
    if not outputs["train"]:
        raise StageError(
            "split: no training rows left after removing the rows too close to "
            "the fixed evaluation sets; see " + str(REMOVED)
        )
    outputs["train"] += [records[i] for i in sorted(added)] + replay
    for name, rows in outputs.items():
        write_jsonl(OUT_DIR / f"{name}.jsonl", rows)
    write_jsonl(
        REMOVED,
        [{**records[i], "split": assignment[i], **why} for i, why in sorted(removed.items())]
        + [{**row, "split": "replay"} for row in replay_left_out],
    )
    return outputs


def build_report(
    records, outputs, removed, added, fixed, groups, leaks, params, task, fractions
) -> dict:
    cfg = params["split"]
    balance = {
        name: dict(
            sorted(
                Counter(
                    task.stratum(answer_of(r)) if "text" not in r else ""
                    for r in rows
                    if not r.get("replay")  # general chat records: no task label
                ).items()
            )
        )
        for name, rows in outputs.items()
    }
    by_reason = Counter(why["reason"] for why in removed.values())
    report = {
        "rows_in": len(records),
        "rows_out": sum(1 for rows in outputs.values() for r in rows if not r.get("replay"))
        - len(added),
        "rows_removed": len(removed),
        "removed_by_reason": dict(sorted(by_reason.items())),
        "rows_added_by_upsampling": len(added),
        "sizes": {name: len(rows) for name, rows in outputs.items()},
        "fractions": fractions,
        "fixed_sets": {name: len(rows) for name, rows in fixed.items() if rows},
        "test_hash": set_hash(outputs["test"]),  # regression compares only equal test sets
        "seed": int(params["seed"]),
        "stratify_by": task.stratify_by,
        "groups": {
            "count": len(groups),
            "multi_row": sum(1 for g in groups if len(g) > 1),
            "largest": max(len(g) for g in groups),
        },
        "class_balance": balance,
        "leakage": {
            "policy": cfg["leakage"]["policy"],
            "min_overlap": float(cfg["leakage"]["min_overlap"]),
            "flagged": len(leaks),
            "rows": leaks[:200],
        },
    }
    assert report["rows_in"] == report["rows_out"] + report["rows_removed"]
    if report["groups"]["largest"] > len(records) * fractions["test"]:
        print(
            f"split: warning: a group of {report['groups']['largest']} near-alike rows went "
            f"to train whole; raise split.group_threshold if groups chain too much"
        )
    return report


if __name__ == "__main__":
    run_stage(main)
