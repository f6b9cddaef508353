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
import json
import math
import random
import tempfile
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.common import paths, tracking
from stages.common.config import StageError, load_params, require_dependency, run_stage
from stages.common.engine import Spool, chunked, iter_lines, map_chunks
from stages.common.files import (
    jsonl_lines,
    jsonl_writer,
    md5_path,
    text_writer,
    write_json,
)
from stages.common.kinds import answer_of, canonical, kind_of, request_text
from stages.common.records import read_file, record_id, set_hash
from stages.common.similarity import (
    UnionFind,
    ngrams,
    signatures,
    similar_pairs,
    text_digests,
)
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


def similar_groups(
    requests, signatures, group_threshold: float, engine: str = "local"
) -> list[list[int]]:
    """Every row in a group: rows with equal requests (equal digests) or near-alike ones
    (MinHash Jaccard >= split.group_threshold) share one; groups sorted by their first row."""
    uf = UnionFind(len(requests))
    first: dict[bytes, int] = {}
    for i, digest in enumerate(requests.tolist()):
        uf.union(first.setdefault(digest, i), i)
    del first
    if group_threshold:
        uf.union_pairs(similar_pairs(signatures, group_threshold, engine=engine))
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

    @classmethod
    def from_parts(cls, first: dict[int, dict[str, int]], requests: dict[str, int], short_words):
        """An index given as its n-gram -> first row maps and its request -> row map (built
        for the n-grams a query set has, not for every reference row)."""
        index = cls([], short_words, set())
        index.first, index.requests = first, requests
        return index

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
    """1. read every row once, a chunk at a time (worker processes), keeping small values per
    row (split, stratum, request digest, MinHash signature on disk, overlap with the fixed and
    external sets); 2. group near-alike requests; 3. set aside rows that copy a fixed
    evaluation set; 4. carve the splits; 5. check leakage; 6. rebalance train; 7. mix the
    replay rows into train; 8. write the splits, the removed rows and the report."""
    params = load_params()
    cfg, leak_cfg = params["split"], params["split"]["leakage"]
    task, seed = Task.from_params(params), int(params["seed"])
    engine = params["data"]["engine"]  # where the per-row work and the LSH buckets run
    replay_cfg = params["data"]["replay"]
    inputs = {"dedup": md5_path(INPUT)}
    if replay_cfg["path"] and replay_cfg["fraction"]:
        require_dependency("split", "data.replay.path", replay_cfg["path"])
        inputs["replay"] = md5_path(Path(replay_cfg["path"]))
    if leak_cfg["external_eval"]:
        require_dependency("split", "split.leakage.external_eval", leak_cfg["external_eval"])
        inputs["external_eval"] = md5_path(Path(leak_cfg["external_eval"]))

    with (
        tracking.stage_run("split", params, ["split", "task"], inputs) as run,
        # beside split_removed.jsonl: data/processed is an output folder, hashed whole
        Spool(REMOVED.parent) as spool,
    ):
        fixed_rows = fixed_set_rows()  # row -> record, of the fixed evaluation sets
        external = (
            external_records(leak_cfg["external_eval"], "split.leakage.external_eval")
            if leak_cfg["external_eval"]
            else []
        )
        rows = survey_rows(params, fixed_rows, external, spool)
        n = len(rows.fixed_split)
        fixed = {
            name: [i for i, f in enumerate(rows.fixed_split) if f == name]
            for name in ("validation", "test")
        }
        if n - sum(map(len, fixed.values())) < len(SPLITS):
            raise StageError(f"{INPUT}: {n} records are too few to split")
        threshold = float(cfg["group_threshold"] or 0)
        groups = similar_groups(rows.requests, rows.signatures, threshold, engine)
        removed = copies_of_fixed_sets(rows, groups)  # row -> why it was removed
        fractions = {name: float(cfg[name]) for name in SPLITS}
        assignment = carve(rows, groups, fixed, removed, fractions, seed)
        parts = {name: [i for i, a in enumerate(assignment) if a == name] for name in SPLITS}
        for i in removed:
            assignment[i] = "train"  # where it would have gone: the fixed sets hold no room
        leaks = [
            *leaks_into_fixed_sets(rows, fixed_rows, fixed, parts, assignment, removed, leak_cfg),
            *leaks_of_carved_test(rows, fixed, parts, removed, leak_cfg),
            *leaks_of_external_eval(rows, external, assignment, removed, leak_cfg),
        ]
        train_rows = [i for i in parts["train"] if i not in removed]
        added = rebalance_train(train_rows, rows.strata, removed, cfg, task, seed)
        guarded = {}
        if replay_cfg["fraction"] and replay_cfg["path"]:  # what replay rows must not copy
            test_rows = {i for i in parts["test"] if i not in removed}
            guarded["test"] = list(read_rows(test_rows).values())
            if params["eval"]["general_path"]:
                path = params["eval"]["general_path"]
                guarded["general_probe"] = external_records(path, "eval.general_path")
        replay, replay_left_out, replay_report = replay_rows(
            replay_cfg, rows.all_chat, len(train_rows) + len(added), guarded, leak_cfg, seed
        )
        del guarded
        sizes, test_hash = write_splits(
            rows, parts, assignment, removed, added, replay, replay_left_out
        )
        report = build_report(
            rows,
            sizes,
            test_hash,
            parts,
            removed,
            added,
            fixed,
            groups,
            leaks,
            params,
            task,
            fractions,
        )
        report["replay"] = replay_report
        write_json(REPORT, report)
        run.summary.update({f"split/{n}": size for n, size in sizes.items()})
        run.summary["split/leaks_flagged"] = len(leaks)
        print(
            f"split: {report['sizes']}, {report['groups']['multi_row']} groups of near-alike "
            f"requests kept together, leakage flagged {len(leaks)}, removed "
            f"{report['removed_by_reason'] or 'nothing'}"
        )


# --- the per-record work: engine.map_chunks runs it on each chunk, in worker processes ------

_WORK: dict = {}


def setup_worker(settings: dict) -> None:
    _WORK.update(settings)
    short = int(settings["short_record_words"])
    _WORK["indexes"] = {
        name: NgramIndex(records, short, {8, 13})
        for name, records in settings["references"].items()
        if records
    }


def measure_chunk(lines: list[str]) -> dict:
    """The small per-row values of a chunk of JSONL lines (see Rows), and each row's overlap
    (share, matching row) with the fixed sets and the external evaluation set."""
    records = [json.loads(line) for line in lines]
    texts = [request_text(r) for r in records]
    task = _WORK["task"]
    return {
        "fixed_split": [r.get("fixed_split") for r in records],
        "strata": [task.stratum(answer_of(r)) if "text" not in r else "" for r in records],
        "chat": all("messages" in r for r in records),
        "ids": [r["id"] for r in records],
        "lines": [r["line"] for r in records],
        "requests": text_digests(texts),
        "words": [len(t.split()) for t in texts],
        # only grouping near-alike requests needs them
        "signatures": signatures(texts if _WORK["group"] else [], 3, 128, _WORK["seed"]),
        "overlaps": {
            name: [index.overlap(r) for r in records] for name, index in _WORK["indexes"].items()
        },
    }


# --- the steps of main ------------------------------------------------------------------------


@dataclass
class Rows:
    """Per input row, in order: small values only; the records stay in the input file."""

    fixed_split: list  # validation | test | train (a reviewed correction) | None
    strata: list[str]
    all_chat: bool  # every row a chat record (replay mixes only into chat training)
    ids: list[str]
    lines: list
    requests: object  # digests of request_text (numpy)
    words: list[int]  # words of the request (the n-gram size of the leakage check)
    signatures: object  # (rows, 128) uint32, memory-mapped from the spool
    overlaps: dict[str, list]  # fixed set or "external_eval" -> (share, matching row) per row


def fixed_set_rows() -> dict[int, dict]:
    """The rows of the fixed evaluation sets (validation, test), by position: a first quick
    read (only lines that mention fixed_split are parsed)."""
    out = {}
    for i, line in enumerate(iter_lines(INPUT)):
        if '"fixed_split"' in line:
            record = json.loads(line)
            if record.get("fixed_split") in ("validation", "test"):
                out[i] = record
    return out


def read_rows(wanted: set[int]) -> dict[int, dict]:
    """The records at the positions `wanted`, in input order (a read of the input)."""
    return {i: json.loads(line) for i, line in enumerate(iter_lines(INPUT)) if i in wanted}


def survey_rows(params: dict, fixed_rows: dict, external: list[dict], spool: Spool) -> Rows:
    by_set = {
        name: [r for r in fixed_rows.values() if r["fixed_split"] == name]
        for name in ("validation", "test")
    }
    settings = {
        "task": Task.from_params(params),
        "seed": int(params["seed"]),
        "group": bool(params["split"]["group_threshold"]),
        "short_record_words": params["split"]["leakage"]["short_record_words"],
        "references": {**by_set, "external_eval": external},
    }
    values: dict[str, list] = {}
    strata: dict[str, str] = {}  # one string object per stratum, shared by its rows
    all_chat, requests = True, []
    signatures_file = spool.rows_file("signatures", 128)
    engine = params["data"]["engine"]
    chunks = chunked(iter_lines(INPUT))
    for chunk in map_chunks(measure_chunk, chunks, setup_worker, (settings,), engine):
        signatures_file.append(chunk.pop("signatures"))
        requests.append(chunk.pop("requests"))
        all_chat &= chunk.pop("chat")
        chunk["strata"] = [strata.setdefault(s, s) for s in chunk["strata"]]
        for name, part in chunk.pop("overlaps").items():
            values.setdefault(f"overlap/{name}", []).extend(part)
        for key, part in chunk.items():
            values.setdefault(key, []).extend(part)
    return Rows(
        fixed_split=values.get("fixed_split", []),
        strata=values.get("strata", []),
        all_chat=all_chat,
        ids=values.get("ids", []),
        lines=values.get("lines", []),
        requests=np.concatenate(requests) if requests else text_digests([]),
        words=values.get("words", []),
        signatures=signatures_file.read(),
        overlaps={
            key.removeprefix("overlap/"): part
            for key, part in values.items()
            if key.startswith("overlap/")
        },
    )


def copies_of_fixed_sets(rows: Rows, groups: list[list[int]]) -> dict[int, dict]:
    """Fixed evaluation sets stay whole: a training row that duplicates or paraphrases one of
    their rows (same group) is removed."""
    removed: dict[int, dict] = {}
    for members in groups:
        anchor = next((i for i in members if rows.fixed_split[i]), None)
        for i in members if anchor is not None else []:
            if not rows.fixed_split[i]:
                exact = rows.requests[i] == rows.requests[anchor]
                removed[i] = {
                    "reason": ("duplicate_of_" if exact else "near_duplicate_of_")
                    + rows.fixed_split[anchor],
                    "matches_line": rows.lines[anchor],
                }
    return removed


def carve(rows: Rows, groups, fixed, removed, fractions, seed) -> list[str]:
    """The split of each row: a fixed set's rows are that split; the other rows are carved by
    stratum and group, the carved splits sharing the fractions of the splits not fixed."""
    shares = {n: 0.0 if fixed.get(n) else f for n, f in fractions.items()}
    shares = {n: f / (sum(shares.values()) or 1) for n, f in shares.items()}
    pool_groups = [g for g in groups if not any(rows.fixed_split[i] or i in removed for i in g)]
    assignment = stratified_group_split(rows.strata, pool_groups, shares, seed)
    for name, members in fixed.items():
        for i in members:
            assignment[i] = name
    for i, fixed_split in enumerate(rows.fixed_split):
        if fixed_split == "train":  # a reviewed correction, moved into train
            assignment[i] = "train"
    return assignment


def leak_entry(rows: Rows, i: int, split: str, share: float, against: str, matches_line) -> dict:
    return {
        "split": split,
        "id": rows.ids[i],
        "line": rows.lines[i],
        "overlap": round(share, 3),
        "against": against,
        "matches_line": matches_line,
    }


def leaks_into_fixed_sets(rows, fixed_rows, fixed, parts, assignment, removed, leak_cfg):
    """A carved row sharing most of its n-grams with a fixed set is removed, whatever the
    policy: the fixed sets never move."""
    min_overlap = float(leak_cfg["min_overlap"])
    leaks = []
    for name, members in fixed.items():
        if not members:
            continue
        for i in [i for n in SPLITS if not fixed.get(n) for i in parts[n]]:
            share, match = rows.overlaps[name][i]
            if share >= min_overlap and i not in removed:
                line = fixed_rows[members[match]]["line"]
                removed[i] = {"reason": f"leak_of_{name}", "matches_line": line}
                leaks.append(leak_entry(rows, i, assignment[i], share, f"fixed {name}", line))
    return leaks


def leaks_of_carved_test(rows: Rows, fixed, parts, removed, leak_cfg) -> list[dict]:
    """Each row of a carved test split against train; `remove` drops the leaking test rows.
    The n-grams of the test rows are indexed, and train is read once to find, for each, the
    first train row that has it (what an index of train would say, in test's memory)."""
    min_overlap, short = float(leak_cfg["min_overlap"]), int(leak_cfg["short_record_words"])
    carved_test = [] if fixed["test"] else parts["test"]
    if not carved_test:
        return []
    sizes = {8 if rows.words[i] < short else 13 for i in carved_test}
    kept_train = [i for i in parts["train"] if i not in removed]
    position = {i: k for k, i in enumerate(kept_train)}
    test_records = read_rows(set(carved_test))
    test_texts = {i: request_text(r) for i, r in test_records.items()}
    grams = {n: set() for n in sizes}
    for i, text in test_texts.items():
        size = 8 if len(text.split()) < short else 13
        grams[size] |= ngrams(text, size) or {text}
    first: dict[int, dict[str, int]] = {n: {} for n in sizes}  # test n-gram -> first train row
    requests: dict[str, int] = {}  # test request -> the last train row asking it
    wanted_requests = {t for i, t in test_texts.items() if "text" not in test_records[i]}
    for i, line in enumerate(iter_lines(INPUT)):
        if i not in position:
            continue
        record = json.loads(line)
        text = request_text(record)
        for n, seen in first.items():
            for gram in ngrams(text, n) & grams[n]:
                seen.setdefault(gram, position[i])
        if text in wanted_requests and "text" not in record:
            requests[text] = position[i]
    train_index = NgramIndex.from_parts(first, requests, short)
    leaks = []
    for i in carved_test:
        share, match = train_index.overlap(test_records[i])
        if share >= min_overlap:
            line = rows.lines[kept_train[match]]
            leaks.append(leak_entry(rows, i, "test", share, "train", line))
            if leak_cfg["policy"] == "remove":
                removed[i] = {"reason": "leak_test_train", "matches_line": line}
    return leaks


def leaks_of_external_eval(rows: Rows, external, assignment, removed, leak_cfg) -> list[dict]:
    """Every row against split.leakage.external_eval, when set."""
    if not external:
        return []
    min_overlap = float(leak_cfg["min_overlap"])
    leaks = []
    for i, (share, match) in enumerate(rows.overlaps["external_eval"]):
        if share >= min_overlap:
            line = external[match]["line"]
            leaks.append(leak_entry(rows, i, assignment[i], share, "external_eval", line))
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
    replay_cfg, all_chat, n_train, guarded, leak_cfg, seed
) -> tuple[list[dict], list[dict], dict]:
    """data.replay: general chat records for train, `fraction` of it after mixing, taken in a
    seeded order (the set repeats whole when it is smaller than asked). A row that shares most
    of its n-grams with a guarded set (the test split, the forgetting probe) is left out: the
    probe would no longer measure forgetting. Returns (rows to mix, rows left out, report)."""
    fraction = float(replay_cfg["fraction"])
    if not fraction or not replay_cfg["path"]:
        return [], [], {"fraction": 0.0, "rows_mixed": 0}
    path = replay_cfg["path"]
    if not all_chat:
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
    rows: Rows, parts, assignment, removed, added, replay, replay_left_out
) -> tuple[dict[str, int], str]:
    """The rows of each split in input order (train then its upsampled repeats and its replay
    rows), and the removed rows with their split and reason (replay rows left out under split
    "replay"), written in one read of the input. Returns the sizes and the test set's hash."""
    sizes = {name: sum(1 for i in members if i not in removed) for name, members in parts.items()}
    if not sizes["train"]:
        raise StageError(
            "split: no training rows left after removing the rows too close to "
            "the fixed evaluation sets; see " + str(REMOVED)
        )
    repeats = Counter(added)
    test_records = []
    with ExitStack() as stack:
        split_file = {
            name: stack.enter_context(text_writer(OUT_DIR / f"{name}.jsonl")) for name in SPLITS
        }
        write_removed = stack.enter_context(jsonl_writer(REMOVED))
        repeated = stack.enter_context(tempfile.TemporaryFile("w+", dir=REMOVED.parent))
        # lines are dedup's, written as they would be here: a row is copied as it is
        for i, line in enumerate(iter_lines(INPUT)):
            if i in removed:
                write_removed({**json.loads(line), "split": assignment[i], **removed[i]})
                continue
            split_file[assignment[i]].write(line)
            if assignment[i] == "test":
                test_records.append(json.loads(line))
            if i in repeats:
                repeated.write(line * repeats[i])
        repeated.seek(0)
        split_file["train"].writelines(repeated)
        split_file["train"].write(jsonl_lines(replay))
        for row in replay_left_out:
            write_removed({**row, "split": "replay"})
    sizes["train"] += len(added) + len(replay)
    return sizes, set_hash(test_records)


def build_report(
    rows, sizes, test_hash, parts, removed, added, fixed, groups, leaks, params, task, fractions
) -> dict:
    cfg = params["split"]
    balance = {
        name: dict(
            sorted(
                Counter(
                    [rows.strata[i] for i in members if i not in removed]
                    + ([rows.strata[i] for i in added] if name == "train" else [])
                ).items()
            )
        )
        for name, members in parts.items()
    }
    by_reason = Counter(why["reason"] for why in removed.values())
    report = {
        "rows_in": len(rows.fixed_split),
        "rows_out": sum(1 for members in parts.values() for i in members if i not in removed),
        "rows_removed": len(removed),
        "removed_by_reason": dict(sorted(by_reason.items())),
        "rows_added_by_upsampling": len(added),
        "sizes": sizes,
        "fractions": fractions,
        "fixed_sets": {name: len(members) for name, members in fixed.items() if members},
        "test_hash": test_hash,  # regression compares only equal test sets
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
    if report["groups"]["largest"] > len(rows.fixed_split) * fractions["test"]:
        print(
            f"split: warning: a group of {report['groups']['largest']} near-alike rows went "
            f"to train whole; raise split.group_threshold if groups chain too much"
        )
    return report


if __name__ == "__main__":
    run_stage(main)
