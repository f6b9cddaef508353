"""Stage augment: top up the rare strata of the training split with paraphrases, each verified.

Off by default (`augment.min_rows: 0`: it writes empty outputs and a report that says so).

1. Count the training rows per stratum (the task's `stratify_by` fields of the answer; replay
   rows aside). A stratum with fewer than `augment.min_rows` rows is rare: its chat rows whose
   request is a user message are the sources, in a seeded order.
2. Ask the generator (the base model, or the OpenAI-compatible endpoint `augment.generator`)
   for `augment.per_row` paraphrases of each source's request (`augment.prompt`), sampled at
   `augment.temperature` with the run's seed, round by round, until the stratum would reach
   `min_rows` or `augment.max_rows` rows are kept in all.
3. Check every candidate; it keeps the first reason it fails:
   - `empty`, `cut` (the token budget ended it), `unchanged` (equal to its source once normalised);
   - the validation suite: the facts validate measures and its Great Expectations rules
     (stages/common/facts.py, expectations.py), with the token budget validate chose;
   - `duplicate` / `near_duplicate`: equal or near-equal (MinHash, the dedup params) to a
     request of train, validation or test, or to a candidate kept before it;
   - `label_mismatch` / `label_off_format`: the generator answers the paraphrase as the
     training row asks it, and the task's label fields of that answer must equal the source's
     (`augment.label_check`).
4. Write the kept rows, each with `meta.synthetic` (generator, seed, source row, stratum,
   whether its label was checked), the rejected ones with their reason, and the report: per
   stratum the rows before, the candidates, what was kept and rejected by reason, the rows after.

Train reads train.jsonl and synthetic.jsonl; nothing here reads or writes validation or test
beyond comparing against them.

Outputs: data/augmented/synthetic.jsonl, data/augmented/rejected.jsonl, reports/augment.json.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections import Counter
from pathlib import Path

from stages.common import expectations, paths, tracking
from stages.common.config import StageError, load_params, run_stage
from stages.common.examples import prompt_text, trained_turns
from stages.common.facts import (
    fact_table,
    label_columns,
    measure,
    measure_tokens,
    special_token_pattern,
)
from stages.common.files import md5_path, read_jsonl, write_json, write_jsonl
from stages.common.generation import Endpoint, answer_prompts
from stages.common.kinds import answer_of, prompt_of, request_text
from stages.common.records import normalize_text, record_id
from stages.common.similarity import near_duplicate_pairs
from stages.common.task import Task

SYNTHETIC, REJECTED = paths.SYNTHETIC, paths.SYNTHETIC_REJECTED
REPORT = paths.stage_report("augment")
SPLITS = {"train": paths.TRAIN, "validation": paths.VALIDATION, "test": paths.TEST}
BASE_GENERATOR = "base model"  # meta.synthetic.generator when augment.generator is null


def main() -> None:
    """1. the rare strata and their sources; 2. paraphrases; 3. the checks; 4. outputs."""
    params = load_params()
    cfg, task, seed = params["augment"], Task.from_params(params), int(params["seed"])
    inputs = {name: md5_path(path) for name, path in SPLITS.items()}
    with tracking.stage_run("augment", params, ["augment", "task"], inputs) as run:
        splits = {name: read_jsonl(path) for name, path in SPLITS.items()}
        counts = stratum_counts(splits["train"], task)
        rare = {s: n for s, n in counts.items() if n < cfg["min_rows"]}
        if cfg["min_rows"] and not task.stratify_by:
            raise StageError(
                f"augment.min_rows={cfg['min_rows']}: augment tops up the strata of "
                f"task.stratify_by, and task '{task.name}' has none (set augment.min_rows=0)"
            )
        sources = source_rows(splits["train"], rare, task, seed)
        if rare and not any(sources.values()):
            raise StageError(
                "augment: the rare strata hold no chat row that ends with a user request and "
                "an answer, so there is nothing to paraphrase (augment works on chat records)"
            )
        kept, rejected, asked = (
            augment(sources, rare, splits, params, task) if rare else ([], [], {})
        )
        write_jsonl(SYNTHETIC, kept)
        write_jsonl(REJECTED, rejected)
        report = build_report(cfg, counts, rare, asked, kept, rejected)
        write_json(REPORT, report)
        run.summary.update(
            {
                "augment/rare_strata": len(rare),
                "augment/candidates": report["candidates"],
                "augment/kept": len(kept),
                **{f"augment/rejected/{k}": v for k, v in report["rejected_by_reason"].items()},
            }
        )
        print(
            f"augment: {len(rare)} strata under {cfg['min_rows']} rows; "
            f"{report['candidates']} candidates, {len(kept)} kept, rejected "
            f"{report['rejected_by_reason']}"
            if cfg["min_rows"]
            else "augment: off (augment.min_rows=0)"
        )


# --- 1. the rare strata and their sources ---------------------------------------------------


def stratum_counts(train: list[dict], task: Task) -> dict[str, int]:
    """Training rows per stratum of the task (replay rows are general chat: no stratum)."""
    if not task.stratify_by:
        return {}
    return dict(
        sorted(
            Counter(
                task.stratum(answer_of(r)) for r in train if not r.get("replay") and "text" not in r
            ).items()
        )
    )


def source_rows(train: list[dict], rare: dict, task: Task, seed: int) -> dict[str, list[dict]]:
    """The rows of each rare stratum a paraphrase can be made of (a chat row whose request is a
    user message), in a seeded order."""
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {s: [] for s in rare}
    for r in train:
        if r.get("replay") or "messages" not in r or r.get("meta", {}).get("synthetic"):
            continue
        stratum = task.stratum(answer_of(r))
        if stratum in out and len(r["messages"]) >= 2 and r["messages"][-2]["role"] == "user":
            out[stratum].append(r)
    for rows in out.values():
        rng.shuffle(rows)
    return out


# --- 2. paraphrases -------------------------------------------------------------------------


class Generator:
    """The base model (loaded once) or an endpoint: paraphrases, and answers for the label
    check."""

    def __init__(self, cfg: dict, seed: int):
        self.cfg, self.seed = cfg, seed
        self.endpoint = (
            Endpoint(cfg["generator"], "augment.generator") if cfg["generator"] else None
        )
        self.name = cfg["generator"]["model"] if cfg["generator"] else BASE_GENERATOR
        if self.endpoint is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            cuda = torch.cuda.is_available()
            bf16 = cuda and torch.cuda.is_bf16_supported()  # bf16 is unusable on CPUs here
            self.tokenizer = AutoTokenizer.from_pretrained(paths.BASE)
            self.model = AutoModelForCausalLM.from_pretrained(
                paths.BASE,
                dtype=torch.bfloat16 if bf16 else torch.float32,
                device_map="cuda" if cuda else "cpu",
            )

    def answers(self, conversations: list[list[dict]], temperature: float, budget: int) -> list:
        """(text, cut by the budget) per conversation; seeded, so a rerun asks the same."""
        if self.endpoint is not None:
            return [
                self.endpoint.reply(c, temperature, budget, seed=self.seed) for c in conversations
            ]
        import torch

        torch.manual_seed(self.seed)
        prompts = [prompt_text(self.tokenizer, c) for c in conversations]
        texts, cut = answer_prompts(
            self.model, self.tokenizer, prompts, self.cfg["batch_size"], budget, temperature
        )
        return list(zip(texts, cut))


def synthetic_record(source: dict, paraphrase: str, stratum: str, generator: str, seed: int):
    """The source row with its request replaced by the paraphrase, and its provenance."""
    messages = [dict(m) for m in source["messages"]]
    messages[-2]["content"] = paraphrase
    content = {"messages": messages, **({"tools": source["tools"]} if "tools" in source else {})}
    return {
        "id": record_id(content),
        "source": str(SYNTHETIC),
        "line": None,  # set when written
        "kind": source["kind"],
        **content,
        "meta": {
            "synthetic": {
                "generator": generator,
                "seed": seed,
                "stratum": stratum,
                "source": {"id": source["id"], "file": source["source"], "line": source["line"]},
            }
        },
    }


def augment(sources: dict, rare: dict, splits: dict, params: dict, task: Task):
    """(kept rows, rejected rows, candidates asked per stratum): rounds of paraphrases over the
    sources of each rare stratum until it is topped up, each round checked before the next."""
    cfg, seed = params["augment"], int(params["seed"])
    generator = Generator(cfg, seed)
    checker = Checker(params, task, splits, generator)
    kept: list[dict] = []
    rejected: list[dict] = []
    asked: Counter[str] = Counter()
    for round_no in range(cfg["per_row"]):
        wanted = {
            s: cfg["min_rows"] - rare[s] - sum(r["meta"]["synthetic"]["stratum"] == s for r in kept)
            for s in rare
        }
        batch = [
            (s, src)
            for s, rows in sources.items()
            for src in rows[: max(0, wanted[s])]
            if len(kept) < cfg["max_rows"]
        ]
        if not batch:
            break
        asks = [
            [
                {
                    "role": "user",
                    "content": cfg["prompt"].format(request=src["messages"][-2]["content"]),
                }
            ]
            for _, src in batch
        ]
        generator.seed = seed + round_no  # each round samples anew
        replies = generator.answers(asks, float(cfg["temperature"]), int(cfg["max_new_tokens"]))
        candidates = [
            synthetic_record(src, text.strip(), s, generator.name, seed + round_no)
            for (s, src), (text, _) in zip(batch, replies)
        ]
        for s, _ in batch:
            asked[s] += 1
        reasons = checker.check(candidates, [src for _, src in batch], [c for _, c in replies])
        for candidate, reason in zip(candidates, reasons):
            if reason is None and len(kept) < cfg["max_rows"]:
                candidate["meta"]["synthetic"]["label_checked"] = bool(cfg["label_check"])
                kept.append(candidate)
                checker.accept(candidate)
            else:
                rejected.append({**candidate, "reason": reason or "max_rows"})
    for i, row in enumerate(kept, 1):
        row["line"] = i
    return kept, rejected, dict(asked)


# --- 3. the checks --------------------------------------------------------------------------


class Checker:
    """The checks of a candidate, in order; `accept` adds a kept row to what later ones are
    compared with."""

    def __init__(
        self, params: dict, task: Task, splits: dict[str, list[dict]], generator: Generator
    ):
        from transformers import AutoTokenizer

        self.params, self.task, self.generator = params, task, generator
        self.tokenizer = AutoTokenizer.from_pretrained(paths.BASE)
        self.leak_pattern = special_token_pattern(self.tokenizer)
        self.template = paths.TRAINING_TEMPLATE.read_text(encoding="utf-8")
        self.max_length = json.loads(paths.MAX_LENGTH.read_text(encoding="utf-8"))["max_length"]
        # every request of every split, and what split and row it is
        self.known = [
            (request_text(r), name, r["id"]) for name, rows in splits.items() for r in rows
        ]
        self.seen = {text: (name, rid) for text, name, rid in self.known}

    def accept(self, row: dict) -> None:
        text = request_text(row)
        self.known.append((text, "synthetic", row["id"]))
        self.seen.setdefault(text, ("synthetic", row["id"]))

    def check(self, rows: list[dict], sources: list[dict], cut: list[bool]) -> list[str | None]:
        reasons: list[str | None] = [None] * len(rows)
        for i, (row, src) in enumerate(zip(rows, sources)):
            said = row["messages"][-2]["content"]
            if not said.strip():
                reasons[i] = "empty"
            elif cut[i]:
                reasons[i] = "cut"
            elif normalize_text(said) == normalize_text(src["messages"][-2]["content"]):
                reasons[i] = "unchanged"
        open_rows = [i for i, r in enumerate(reasons) if r is None]
        for i, reason in zip(open_rows, self.suite([rows[i] for i in open_rows])):
            reasons[i] = reason
        open_rows = [i for i, r in enumerate(reasons) if r is None]
        for i, reason in zip(open_rows, self.duplicates([rows[i] for i in open_rows])):
            reasons[i] = reason
        if self.params["augment"]["label_check"]:
            open_rows = [i for i, r in enumerate(reasons) if r is None]
            checked = self.labels([rows[i] for i in open_rows], [sources[i] for i in open_rows])
            for i, reason in zip(open_rows, checked):
                reasons[i] = reason
        return reasons

    def suite(self, rows: list[dict]) -> list[str | None]:
        """validate's GX suite on the candidates: the first failing rule's reason code."""
        if not rows:
            return []
        facts = [{"structure_error": None, **measure(r, self.leak_pattern)} for r in rows]
        objective = self.params["objective"]
        policy = self.params["data"]["length_policy"]
        limit = self.max_length if policy == "truncate" else None
        measure_tokens(facts, rows, self.tokenizer, self.template, trained_turns(objective), limit)
        label_columns(facts, self.task)
        with tempfile.TemporaryDirectory() as docs:  # validate's Data Docs are the ones kept
            failures, _ = expectations.check_rows(
                fact_table(facts),
                self.task,
                self.max_length,
                policy,
                rows[0]["kind"],
                Path(docs) / "d",
            )
        return [failures[i][0] if i in failures else None for i in range(len(rows))]

    def duplicates(self, rows: list[dict]) -> list[str | None]:
        """Equal to a known request once normalised, or near-equal by MinHash (dedup params):
        `duplicate` / `near_duplicate` of <split>:<id>; of two close candidates the later loses."""
        dedup, seed = self.params["dedup"], int(self.params["seed"])
        texts = [request_text(r) for r in rows]
        known = [t for t, _, _ in self.known]
        out: list[str | None] = []
        for k, text in enumerate(texts):
            if text in self.seen:
                out.append("duplicate of {}:{}".format(*self.seen[text]))
            elif text in texts[:k]:
                out.append(f"duplicate of candidate:{rows[texts.index(text)]['id']}")
            else:
                out.append(None)
        pairs = near_duplicate_pairs(
            known + texts,
            dedup["shingle_size"],
            dedup["num_perm"],
            float(dedup["threshold"]),
            seed,
        )
        n = len(known)
        for a, b in pairs:  # a < b: b is a candidate whenever the pair holds one
            if b < n or out[b - n] is not None or (a >= n and out[a - n] is not None):
                continue
            name, rid = (
                (self.known[a][1], self.known[a][2]) if a < n else ("candidate", rows[a - n]["id"])
            )
            out[b - n] = f"near_duplicate of {name}:{rid}"
        return out

    def labels(self, rows: list[dict], sources: list[dict]) -> list[str | None]:
        """The generator answers each paraphrase as its training row asks it (greedy); the
        task's label fields of that answer must equal the source's."""
        if not rows:
            return []
        budget = max(
            16, max(len(self.tokenizer(answer_of(s))["input_ids"]) for s in sources) * 3 // 2
        )
        replies = self.generator.answers([prompt_of(r) for r in rows], 0.0, budget)
        out: list[str | None] = []
        for (text, _), src in zip(replies, sources):
            got, want = self.task.parse(text), self.task.parse(answer_of(src)) or {}
            if got is None:
                out.append(f"label_off_format: {text[:80]!r}")
                continue
            differ = {f: got.get(f) for f in self.task.labels if got.get(f) != want.get(f)}
            out.append(f"label_mismatch: {differ}" if differ else None)
        return out


# --- 4. the report --------------------------------------------------------------------------


def reason_code(reason: str) -> str:
    """The code of a rejection reason ("near_duplicate of train:ab12" -> "near_duplicate")."""
    return reason.split(":")[0].split(" of ")[0]


def build_report(cfg, counts, rare, asked, kept, rejected) -> dict:
    """Per stratum: rows before, candidates asked, kept, rejected by reason, rows after."""
    gained = Counter(r["meta"]["synthetic"]["stratum"] for r in kept)
    by_stratum = {
        s: {
            "before": n,
            "candidates": asked.get(s, 0),
            "kept": gained.get(s, 0),
            "rejected": dict(
                sorted(
                    Counter(
                        reason_code(r["reason"])
                        for r in rejected
                        if r["meta"]["synthetic"]["stratum"] == s
                    ).items()
                )
            ),
            "after": n + gained.get(s, 0),
        }
        for s, n in counts.items()
        if s in rare
    }
    report = {
        "enabled": bool(cfg["min_rows"]),
        "min_rows": cfg["min_rows"],
        "generator": (cfg["generator"] or {}).get("model", BASE_GENERATOR),
        "label_check": cfg["label_check"],
        "strata": len(counts),
        "rare_strata": len(rare),
        "candidates": len(kept) + len(rejected),
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": dict(
            sorted(Counter(reason_code(r["reason"]) for r in rejected).items())
        ),
        "by_stratum": by_stratum,
        "examples": {
            "kept": [example(r) for r in kept[:5]],
            "rejected": [example(r) for r in rejected[:10]],
        },
    }
    assert report["candidates"] == sum(s["candidates"] for s in by_stratum.values())
    return report


def example(row: dict) -> dict:
    """A kept or rejected row, short, for the report."""
    out = {
        "stratum": row["meta"]["synthetic"]["stratum"],
        "source_line": row["meta"]["synthetic"]["source"]["line"],
        "paraphrase": row["messages"][-2]["content"][:200],
    }
    if "reason" in row:
        out["reason"] = row["reason"]
    return out


if __name__ == "__main__":
    run_stage(main)
