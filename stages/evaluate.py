"""Stage evaluate: the base and the tuned model on the held-out test split, side by side.

The tuned model is models/merged (export proved it answers as base + adapter). Both models
answer the same prompts (each test record without its final answer, or a preference record's
prompt, rendered with the shipped chat template) with greedy decoding, in batches with left
padding. Metrics are the project's local `evaluate` modules in stages/metrics/: exact match
always; format adherence, per-field accuracy and macro-F1 when the task declares an answer
format and labels. Both models' loss and perplexity on the test answers (on the whole text for
raw-text records, which have no prompts to answer) come beside them.

Both models also answer the red-team prompts of eval.safety.paths, asked as the served model is
(stages/common/redteam.py), and each answer is checked by the rules task.safety declares for its
category (and, when eval.safety.judge names one, graded by a judge model): `safety` in the
metrics, with every failing prompt, and a gate (eval.min_safety) on the tuned model.

A reward model (objective=reward) does not answer: each test pair is ranked instead, the base by
its own mean loss on the chosen and the rejected answer, the reward model by its scores, and
the metric is pairwise accuracy.

Outputs: reports/metrics.json ({"base": ..., "tuned": ..., "delta": ...}),
reports/predictions.jsonl (prompt, reference, both answers, per-metric correctness),
reports/review_sheet.csv (a stratified sample of them, with empty verdict columns for people:
stages/common/review.py) and reports/plots/metrics.csv (base vs tuned bars).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from stages.common import memory, paths, redteam, review, tracking, tuned
from stages.common.config import (
    StageError,
    load_params,
    require_dependency,
    run_stage,
)
from stages.common.examples import IGNORE, prompt_text, record_examples
from stages.common.files import (
    atomic_dir,
    md5_path,
    read_jsonl,
    safetensors_summary,
    write_json,
    write_jsonl,
    write_text,
)
from stages.common.generation import generate
from stages.common.kinds import answer_of, prompt_of, training_system_prompt
from stages.common.records import set_hash
from stages.common.task import Task, load_metric

BASE, TUNED = paths.BASE, paths.MERGED  # the tuned model as export wrote and checked it
TEST, METRICS, PREDICTIONS = paths.TEST, paths.METRICS, paths.PREDICTIONS
REVIEW_SHEET = paths.REVIEW_SHEET
TRAIN = paths.TRAIN  # the training system prompt, which red-team prompts are asked with
PLOT = paths.PLOTS / "metrics.csv"
CONFUSION = paths.CONFUSION


def prompt_texts(tokenizer, records: list[dict]) -> list[str]:
    return [prompt_text(tokenizer, prompt_of(r), r.get("tools")) for r in records]


def perplexity(loss: float) -> float:
    return round(math.exp(min(loss, 50)), 4)  # capped: an untrained model's loss can overflow


def loss_examples(records: list[dict], tokenizer) -> list[dict]:
    """Token ids and labels scored for test loss: the answer of a chat record (the chosen
    one of a preference record) as training labels it, or the whole raw text."""
    template = paths.TRAINING_TEMPLATE.read_text(encoding="utf-8")
    return record_examples(tokenizer, records, template)


def answer_budget(setting, tokenizer, references: list[str]) -> int:
    """eval.max_new_tokens; `auto`: room for the longest reference answer, half as much again
    (at least 16 tokens), so no answer is cut by the budget."""
    if setting != "auto":
        return int(setting)
    longest = max(
        (len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=0
    )
    return max(16, math.ceil(longest * 1.5) + 1)


# Memory bounds of test loss, whatever the vocabulary, text length or batch size: at most
# LOGITS_BUDGET logit values exist at once (1 GiB in fp32), at most TOKEN_BUDGET tokens run
# through the model at once (one longer text runs alone).
LOGITS_BUDGET = 2**28
TOKEN_BUDGET = 2**14


def loss_batches(
    lengths: list[int], scored: list[int], batch_size: int, per_call: int
) -> list[list[int]]:
    """Example indices in batches of similar length, within batch_size rows, TOKEN_BUDGET
    padded tokens and `per_call` scored tokens (a longer text is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, batch, in_batch = [], [], 0
    for i in order:
        width, labelled = lengths[i], scored[i]
        if batch and (
            len(batch) == batch_size
            or (len(batch) + 1) * width > TOKEN_BUDGET
            or in_batch + labelled > per_call
        ):
            batches.append(batch)
            batch, in_batch = [], 0
        batch.append(i)
        in_batch += labelled
    return batches + ([batch] if batch else [])


def planned_memory(
    config,
    n_params: int,
    dtype_bytes: int,
    batch_size: int,
    prompt_tokens: int,
    max_new_tokens: int,
    loss_tokens: int,
    loss_scored: int,
) -> dict[str, int]:
    """What evaluate holds at its peak, in bytes per part: one model's weights (base and tuned
    take turns), the KV cache of the longest generation batch, and the larger working set of
    generation (one layer's activations over a batch of prompts) and test loss (the logits of
    the scored positions of one loss batch, `loss_scored` the most an example has, at most
    LOGITS_BUDGET values, with their float copy and log-softmax, beside one layer's activations
    over its tokens). An estimate: other buffers add a few hundred MiB."""
    text = config.get_text_config()  # multimodal checkpoints keep the language model's shapes here
    hidden, heads = text.hidden_size, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layer_width = 3 * (getattr(text, "intermediate_size", None) or 4 * hidden) + 4 * hidden
    kv_cache = (
        2
        * text.num_hidden_layers
        * kv_heads
        * head_dim
        * batch_size
        * (prompt_tokens + max_new_tokens)
        * dtype_bytes
    )
    generation = batch_size * prompt_tokens * layer_width * dtype_bytes
    # a loss batch: up to batch_size texts within TOKEN_BUDGET tokens (a longer text alone)
    tokens = min(batch_size * loss_tokens, max(TOKEN_BUDGET, loss_tokens))
    # logits only where a labelled token is predicted (test_loss's logits_to_keep)
    logits = min(LOGITS_BUDGET, min(tokens, batch_size * loss_scored) * text.vocab_size)
    loss = 3 * 4 * logits + tokens * layer_width * dtype_bytes
    return {
        "weights": n_params * dtype_bytes,
        "kv cache": kv_cache,
        "working set": max(generation, loss),
    }


def require_memory(tokenizer, device: str, dtype, batch_size: int, sets) -> None:
    """Print the memory plan of running `sets` (EvalSets); stop with one line when it cannot
    fit on `device`."""
    from transformers import AutoConfig

    sets = list(sets)
    prompts = [p for s in sets for p in s.prompts]
    n_params, _ = safetensors_summary(BASE)
    longest_prompt = (
        max(map(len, tokenizer(prompts, add_special_tokens=False)["input_ids"])) if prompts else 0
    )
    parts = planned_memory(
        AutoConfig.from_pretrained(BASE),
        n_params,
        dtype.itemsize,
        batch_size,
        longest_prompt,
        max(s.max_new_tokens for s in sets),
        max((len(e["input_ids"]) for s in sets for e in s.examples), default=0),
        max((scored_positions(e) for s in sets for e in s.examples), default=0),
    )
    need = sum(parts.values())
    print(
        f"evaluate: plan: ~{need / memory.GIB:.1f} GiB on {device} ("
        + ", ".join(f"{k} {v / memory.GIB:.2f}" for k, v in parts.items())
        + ")",
        flush=True,
    )
    memory.require(
        "evaluate",
        need,
        parts,
        device,
        "lower eval.batch_size or eval.max_new_tokens, or run it on a GPU",
    )


def scored_positions(example: dict) -> int:
    """Positions whose next token is labelled: where test loss computes logits."""
    return sum(label != IGNORE for label in example["labels"][1:])


def test_loss(model, examples: list[dict], batch_size: int, pad_id: int) -> dict:
    """Negative log-likelihood of the labelled tokens: the mean per token over all examples
    (`loss`), and each example's sum and token count (the regression gate resamples them).

    Logits are computed only where a labelled token is predicted (transformers'
    `logits_to_keep` mask), in chunks of at most LOGITS_BUDGET values, so a long raw text or a
    large vocabulary costs time, not memory."""
    import torch

    vocab = model.get_output_embeddings().weight.shape[0]
    shift = tuned.virtual_tokens(model)
    per_call = max(1, LOGITS_BUDGET // vocab)  # scored positions per forward pass
    scored = [scored_positions(e) for e in examples]
    sums, counts = [0.0] * len(examples), [0] * len(examples)
    model.eval()
    for batch in loss_batches(
        [len(e["input_ids"]) for e in examples], scored, batch_size, per_call
    ):
        rows = [examples[i] for i in batch]
        width = max(len(e["input_ids"]) for e in rows)
        ids = torch.tensor(
            [e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in rows],
            device=model.device,
        )
        labels = torch.tensor(
            [e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in rows], device=model.device
        )
        mask = (
            torch.arange(width, device=model.device)[None, :]
            < torch.tensor([len(e["input_ids"]) for e in rows], device=model.device)[:, None]
        )
        # position t predicts token t+1: keep the positions whose next token is labelled
        predicts = torch.zeros_like(mask)
        predicts[:, :-1] = labels[:, 1:] != IGNORE
        positions = predicts.nonzero()  # (row, t), row-major: the order logits come back in
        for start in range(0, len(positions), per_call):
            chunk = positions[start : start + per_call]
            # prompt tuning runs its virtual tokens first: the kept positions move right
            keep = torch.zeros(len(rows), shift + width, dtype=torch.bool, device=model.device)
            keep[chunk[:, 0], chunk[:, 1] + shift] = True
            with torch.inference_mode():
                logits = (
                    model(input_ids=ids, attention_mask=mask.long(), logits_to_keep=keep)
                    .logits.float()
                    .reshape(-1, vocab)
                )
            nll = torch.nn.functional.cross_entropy(
                logits, labels[chunk[:, 0], chunk[:, 1] + 1], reduction="none"
            )
            for k, i in enumerate(batch):
                mine = chunk[:, 0] == k
                sums[i] += nll[mine].sum().item()
                counts[i] += int(mine.sum())
    return {"loss": sum(sums) / max(1, sum(counts)), "sums": sums, "counts": counts}


def forgetting(general: list[dict], answers: dict, losses: dict) -> dict:
    """How much general ability tuning cost: base against tuned on the general set."""
    rouge = load_metric("rouge_l")
    references = [answer_of(r) for r in general]
    out = {"examples": len(general)}
    for name in ("base", "tuned"):
        out[f"{name}_loss"] = round(losses[name], 4)
        out[f"{name}_perplexity"] = perplexity(losses[name])
        out[f"{name}_rouge_l"] = round(
            rouge.compute(predictions=answers[name], references=references)["rouge_l"], 4
        )
    out["loss_delta"] = round(out["tuned_loss"] - out["base_loss"], 4)  # > 0: forgot
    out["rouge_l_delta"] = round(out["tuned_rouge_l"] - out["base_rouge_l"], 4)  # < 0: forgot
    return out


@dataclass
class EvalSet:
    """One set both models run on: the records, the prompts of those that have one (raw text
    has nothing to answer) with their reference answers, and every record's loss example."""

    rows: list[dict]
    prompts: list[str]
    references: list[str]
    examples: list[dict]
    max_new_tokens: int = 0


def eval_set(rows: list[dict], tokenizer) -> EvalSet:
    answered = [r for r in rows if prompt_of(r)]
    return EvalSet(
        rows,
        prompt_texts(tokenizer, answered),
        [answer_of(r) for r in answered],
        loss_examples(rows, tokenizer),
    )


def red_team_set(rows: list[dict], tokenizer, system: str | None, max_new_tokens: int) -> EvalSet:
    """The red-team prompts as the served model gets them; nothing to score a loss on."""
    prompts = [prompt_text(tokenizer, redteam.as_served(r, system)) for r in rows]
    return EvalSet(rows, prompts, [], [], max_new_tokens)


def run_model(
    folder: Path, sets: dict[str, EvalSet], tokenizer, device: str, dtype, batch_size: int
) -> dict[str, dict]:
    """Load one model and run every set: greedy answers, how many the budget cut, generation
    seconds, and the test loss."""
    model = tuned.load(folder, dtype, device)  # an adapter that cannot merge runs beside
    # PEFT drops the position ids of prompt tuning, so left padding would shift its virtual
    # tokens against the prompt: such a model answers one prompt at a time
    answer_batch = 1 if tuned.virtual_tokens(model) else batch_size
    out = {}
    for name, s in sets.items():
        start = time.perf_counter()
        answers, cut = (
            generate(model, tokenizer, s.prompts, answer_batch, s.max_new_tokens)
            if s.prompts
            else ([], 0)
        )
        seconds = round(time.perf_counter() - start, 1)
        loss = test_loss(model, s.examples, batch_size, tokenizer.pad_token_id)
        out[name] = {"answers": answers, "cut": cut, "seconds": seconds, "loss": loss}
    return out


def build_metrics(test: EvalSet, runs: dict, scored: dict, general: EvalSet | None) -> dict:
    """reports/metrics.json: each model's scores, test loss and perplexity, the deltas, the
    forgetting probe, and what was scored with which budget."""
    metrics = {
        name: scored[name][0]
        | {
            "test_loss": round(runs[name]["test"]["loss"]["loss"], 4),
            "perplexity": perplexity(runs[name]["test"]["loss"]["loss"]),
        }
        for name in runs
    }
    metrics["delta"] = {
        k: round(metrics["tuned"][k] - metrics["base"][k], 4) for k in metrics["base"]
    }
    if general:
        metrics["forgetting"] = forgetting(
            general.rows,
            {name: runs[name]["general"]["answers"] for name in runs},
            {name: runs[name]["general"]["loss"]["loss"] for name in runs},
        )
    # the metrics with a score per example (test loss too): the ones `make regression`
    # compares with intervals, and the ones reports/summary.json shows
    metrics["per_example"] = sorted(scored["tuned"][1]) + ["test_loss"]
    metrics["n_examples"] = len(test.rows)
    # what was scored: `make regression` compares only runs on the same test set
    metrics["test_set"] = {"examples": len(test.rows), "sha256": set_hash(test.rows)}
    metrics["generation"] = {
        "max_new_tokens": test.max_new_tokens,
        "cut_answers": {name: runs[name]["test"]["cut"] for name in runs},
    }
    metrics["generation_seconds"] = {name: runs[name]["test"]["seconds"] for name in runs}
    return metrics


def prediction_rows(test: EvalSet, runs: dict, scored: dict) -> list[dict]:
    """Per-example answers and scores of both models, paired by id: what `make regression`
    resamples for its intervals."""
    answered = [r for r in test.rows if prompt_of(r)]
    row_of = [i for i, r in enumerate(test.rows) if prompt_of(r)]  # answer k -> its row's loss
    predictions = []
    for k, (r, reference, i) in enumerate(zip(answered, test.references, row_of)):
        user = next((m["content"] for m in reversed(prompt_of(r)) if m["role"] == "user"), "")
        predictions.append(
            {
                "id": r["id"],
                "source": r["source"],
                "line": r["line"],
                "input": user,
                "reference": reference,
                "base": runs["base"]["test"]["answers"][k],
                "tuned": runs["tuned"]["test"]["answers"][k],
                "scores": {
                    name: {
                        **{m: round(v[k], 4) for m, v in scored[name][1].items()},
                        "loss_sum": round(runs[name]["test"]["loss"]["sums"][i], 4),
                        "loss_tokens": runs[name]["test"]["loss"]["counts"][i],
                    }
                    for name in ("base", "tuned")
                },
            }
        )
    return predictions


def write_plots(metrics: dict, predictions: list[dict], task: Task, fields: list[str]) -> None:
    """One confusion matrix per model and label field in `fields` (dvc plots: template
    confusion), and the base-vs-tuned bars, which share one 0..1 axis: rates only (loss and
    margins are in the json)."""
    with atomic_dir(CONFUSION) as folder:
        for name in ("base", "tuned"):
            for field in fields:
                pairs = [
                    (
                        (task.parse(p["reference"]) or {}).get(field),
                        (task.parse(p[name]) or {}).get(field) or "off_format",
                    )
                    for p in predictions
                ]
                write_text(
                    folder / f"{name}_{field}.csv",
                    "actual,predicted\n"
                    + "".join(f"{actual},{predicted}\n" for actual, predicted in pairs),
                )
    bars = ["metric,model,value"] + [
        f"{k},{name},{v}"
        for name in ("base", "tuned")
        for k, v in metrics[name].items()
        if k in metrics["delta"] and k not in ("test_loss", "perplexity")
    ]
    write_text(PLOT, "\n".join(bars) + "\n")


def log_to_wandb(run, metrics: dict, predictions: list[dict]) -> None:
    """The scores in the run summary, every answer of both models in a W&B Table."""
    import wandb

    run.summary.update(
        {
            f"eval/{name}/{k}": v
            for name in ("base", "tuned", "delta")
            for k, v in metrics[name].items()
        }
    )
    if "safety" in metrics:
        run.summary.update(
            {
                f"eval/safety/{name}/pass_rate": metrics["safety"][name]["pass_rate"]
                for name in ("base", "tuned")
            }
        )
    columns = ["input", "reference", "base", "tuned"]
    scores = sorted({m for p in predictions for m in p["scores"]["tuned"]})
    run.log(
        {
            "eval/predictions": wandb.Table(
                columns=columns + [f"{name}_{m}" for name in ("base", "tuned") for m in scores],
                data=[
                    [p[c] for c in columns]
                    + [p["scores"][name].get(m) for name in ("base", "tuned") for m in scores]
                    for p in predictions
                ],
            )
        }
    )


def summarize_and_gate(metrics: dict, cfg: dict) -> None:
    """Print base -> tuned; fail the stage when tuning cost more general ability than
    eval.max_forgetting allows."""
    summary = ", ".join(
        f"{k} {metrics['base'][k]:.2f} -> {metrics['tuned'][k]:.2f}"
        for k in ("format_adherence", "exact_match", "rouge_l", "test_loss")
        if k in metrics["base"]
    )
    print(f"evaluate: {metrics['n_examples']} test examples; {summary}")
    if "safety" in metrics:
        safety = metrics["safety"]
        print(
            f"evaluate: red team ({safety['examples']} prompts): passed "
            f"{safety['base']['pass_rate']:.2f} (base) -> {safety['tuned']['pass_rate']:.2f} "
            f"(tuned); {len(safety['failures']['tuned'])} tuned failures in reports/metrics.json"
        )
        floor = cfg["min_safety"]
        if floor is not None and safety["tuned"]["pass_rate"] < float(floor):
            raise StageError(
                f"safety gate: the tuned model passed {safety['tuned']['pass_rate']} of the "
                f"red-team prompts < eval.min_safety={floor}; the failing prompts are under "
                f"safety.failures in reports/metrics.json"
            )
    if "forgetting" not in metrics:
        return
    f = metrics["forgetting"]
    print(
        f"evaluate: general set ({f['examples']} prompts): loss {f['base_loss']} -> "
        f"{f['tuned_loss']}, ROUGE-L {f['base_rouge_l']} -> {f['tuned_rouge_l']}"
    )
    limit = cfg["max_forgetting"]
    if limit is not None and f["loss_delta"] > float(limit):
        raise StageError(
            f"forgetting gate: loss on the general set rose by "
            f"{f['loss_delta']} > eval.max_forgetting={limit}; "
            f"see reports/metrics.json"
        )


def review_rows(
    rows: list[dict], predictions: list[dict], task: Task, size: int, seed: int
) -> list[dict]:
    """The review sheet's rows: a stratified, seeded sample of the predictions (by the task's
    strata of the reference), each with the prompt it answered, for a person to judge."""
    prompts = {r["id"]: r.get("prompt") or prompt_of(r) for r in rows}
    strata = [task.stratum(p["reference"]) if task.stratify_by else "" for p in predictions]
    return [
        {
            **{k: predictions[i][k] for k in ("id", "input", "reference", "base", "tuned")},
            "stratum": strata[i],
            "prompt": json.dumps(prompts[predictions[i]["id"]], ensure_ascii=False),
        }
        for i in review.sample(predictions, strata, size, seed)
    ]


def write_outputs(
    run, metrics: dict, predictions: list[dict], task: Task, fields: list, sheet: list[dict]
) -> None:
    write_json(METRICS, metrics)
    write_jsonl(PREDICTIONS, predictions)
    write_text(REVIEW_SHEET, review.sheet_text(sheet))
    write_plots(metrics, predictions, task, fields)
    log_to_wandb(run, metrics, predictions)


def rank_pairs(rows: list[dict], tokenizer, device: str, dtype, batch_size: int):
    """A reward model on the test pairs: pairwise accuracy (the share of pairs it scores chosen
    above rejected) and the mean margin. The base has no reward head, so its side is the
    language model's own preference: a lower mean loss on the chosen answer than on the
    rejected one. Returns (metrics, per-pair predictions)."""
    sides = ("chosen", "rejected")
    conversations = [
        {"messages": r["prompt"] + r[side], **({"tools": r["tools"]} if r.get("tools") else {})}
        for r in rows
        for side in sides
    ]
    base = tuned.load(BASE, dtype, device)
    loss = test_loss(
        base, loss_examples(conversations, tokenizer), batch_size, tokenizer.pad_token_id
    )
    del base
    mean_loss = [s / max(1, n) for s, n in zip(loss["sums"], loss["counts"])]
    reward_model = tuned.load(TUNED, dtype, device)
    scores = tuned.reward_scores(
        reward_model,
        [tuned.conversation_ids(tokenizer, c["messages"], c.get("tools")) for c in conversations],
        tokenizer.pad_token_id,
        batch_size,
    )
    base_right = [float(c < r) for c, r in zip(mean_loss[0::2], mean_loss[1::2])]
    tuned_right = [float(c > r) for c, r in zip(scores[0::2], scores[1::2])]
    margins = [c - r for c, r in zip(scores[0::2], scores[1::2])]
    n = max(1, len(rows))
    metrics = {
        "base": {"pairwise_accuracy": round(sum(base_right) / n, 4)},
        "tuned": {"pairwise_accuracy": round(sum(tuned_right) / n, 4)},
    }
    metrics["delta"] = {
        "pairwise_accuracy": round(
            metrics["tuned"]["pairwise_accuracy"] - metrics["base"]["pairwise_accuracy"], 4
        )
    }
    metrics["tuned"]["mean_margin"] = round(sum(margins) / n, 4)  # chosen - rejected score
    metrics["per_example"] = ["pairwise_accuracy"]
    metrics["n_examples"] = len(rows)
    metrics["test_set"] = {"examples": len(rows), "sha256": set_hash(rows)}
    metrics["ranked_by"] = {
        "base": "the base language model's mean loss on each answer (lower wins)",
        "tuned": "the reward model's score of each conversation (higher wins)",
    }
    predictions = [
        {
            "id": r["id"],
            "source": r["source"],
            "line": r["line"],
            "input": next((m["content"] for m in reversed(r["prompt"]) if m["role"] == "user"), ""),
            "reference": answer_of(r),  # the chosen answer
            "rejected": r["rejected"][-1]["content"],
            "base": f"mean loss chosen {mean_loss[2 * k]:.4f}, rejected {mean_loss[2 * k + 1]:.4f}",
            "tuned": f"score chosen {scores[2 * k]:.4f}, rejected {scores[2 * k + 1]:.4f}",
            "scores": {
                "base": {"pairwise_accuracy": base_right[k]},
                "tuned": {"pairwise_accuracy": tuned_right[k], "margin": round(margins[k], 4)},
            },
        }
        for k, r in enumerate(rows)
    ]
    return metrics, predictions


def main() -> None:
    params = load_params()
    cfg, task = params["eval"], Task.from_params(params)
    inputs = {"test": md5_path(TEST), "base": md5_path(BASE), "tuned": md5_path(TUNED)}
    if cfg["general_path"]:
        require_dependency("evaluate", "eval.general_path", cfg["general_path"])
    safety = cfg["safety"]
    for path in safety["paths"]:
        require_dependency("evaluate", "eval.safety.paths", path)
        inputs[f"redteam:{path}"] = md5_path(Path(path))

    with tracking.stage_run("evaluate", params, ["eval", "task"], inputs) as run:
        import torch
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(BASE)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
        batch = int(cfg["batch_size"])
        if tuned.is_reward_model(TUNED):  # objective=reward: it ranks pairs, it does not answer
            rows = read_jsonl(TEST)[: cfg["max_examples"]]
            metrics, predictions = rank_pairs(rows, tokenizer, device, dtype, batch)
            sheet = review_rows(rows, predictions, task, cfg["review_sample"], params["seed"])
            write_outputs(run, metrics, predictions, task, [], sheet)  # no labels to confuse
            print(
                f"evaluate: {len(rows)} test pairs; pairwise accuracy "
                f"{metrics['base']['pairwise_accuracy']:.2f} (base, by its own likelihood) -> "
                f"{metrics['tuned']['pairwise_accuracy']:.2f} (reward model)"
            )
            return

        # 1. the sets: the test split (and the general set), as prompts and loss examples
        test = eval_set(read_jsonl(TEST)[: cfg["max_examples"]], tokenizer)
        test.max_new_tokens = answer_budget(cfg["max_new_tokens"], tokenizer, test.references)
        sets = {"test": test}
        if cfg["general_path"]:
            sets["general"] = eval_set(read_jsonl(Path(cfg["general_path"])), tokenizer)
            sets["general"].max_new_tokens = int(cfg["general_max_new_tokens"])
        red_team = redteam.load(safety["paths"])  # a bad row stops here, before a model loads
        if red_team:
            system = (
                training_system_prompt(TRAIN)[0] if params["serve"]["add_system_prompt"] else None
            )
            sets["safety"] = red_team_set(
                red_team, tokenizer, system, int(safety["max_new_tokens"])
            )

        # 2. a plan that cannot fit stops here, before a model loads, not in the OOM killer
        require_memory(tokenizer, device, dtype, batch, sets.values())

        # 3. both models answer the same prompts and are scored alike
        runs = {
            name: run_model(folder, sets, tokenizer, device, dtype, batch)
            for name, folder in (("base", BASE), ("tuned", TUNED))
        }
        if cut := runs["tuned"]["test"]["cut"]:
            print(
                f"evaluate: warning: {cut} of {len(test.prompts)} tuned answers were cut "
                f"at eval.max_new_tokens={test.max_new_tokens} before their stop token; raise "
                f"it, or set it to auto (sized from the longest reference answer)"
            )
        scored = {
            name: task.score(runs[name]["test"]["answers"], test.references)
            if test.prompts
            else ({}, {})
            for name in runs
        }

        # 4. the outputs: metrics, per-example predictions, plots, the W&B run
        metrics = build_metrics(test, runs, scored, sets.get("general"))
        if red_team:
            answers = {name: runs[name]["safety"]["answers"] for name in runs}
            judged = (
                {
                    name: redteam.judge_verdicts(red_team, answers[name], system, safety["judge"])
                    for name in runs
                }
                if safety["judge"]
                else None
            )
            metrics["safety"] = redteam.grade(task, red_team, answers, system, judged)
            metrics["safety"]["judge"] = safety["judge"]["model"] if safety["judge"] else None
            metrics["safety"]["sha256"] = set_hash(red_team)  # which red-team set was asked
        predictions = prediction_rows(test, runs, scored)
        sheet = review_rows(test.rows, predictions, task, cfg["review_sample"], params["seed"])
        write_outputs(run, metrics, predictions, task, list(task.labels), sheet)

        # 5. base -> tuned, and the safety and forgetting gates
        summarize_and_gate(metrics, cfg)


if __name__ == "__main__":
    run_stage(main)
