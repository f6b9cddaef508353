"""Stage evaluate: the base and the tuned model on the held-out test split, side by side.

Both models answer the same prompts (the test records without their final answer, rendered with
the shipped chat template) with greedy decoding, in batches with left padding. Metrics are the
project's local `evaluate` modules in stages/metrics/: exact match always; format adherence,
per-field accuracy and macro-F1 when the task declares an answer format and labels.

Outputs: reports/metrics.json ({"base": ..., "tuned": ..., "delta": ...}),
reports/predictions.jsonl (prompt, reference, both answers, per-metric correctness) and
reports/plots/metrics.csv (base vs tuned bars).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

from stages.common import tracking
from stages.common.config import load_params, run_stage
from stages.common.files import md5_path, read_jsonl, write_json, write_jsonl, write_text
from stages.common.task import Task

BASE, TUNED = Path("models/base"), Path("models/tuned")
TEST = Path("data/processed/test.jsonl")
METRICS = Path("reports/metrics.json")
PREDICTIONS = Path("reports/predictions.jsonl")
PLOT = Path("reports/plots/metrics.csv")
METRIC_MODULES = Path(__file__).parent / "metrics"


def load_tuned(base_model):
    from transformers import AutoModelForCausalLM

    if (TUNED / "adapter_config.json").exists():
        from peft import PeftModel

        # merged weights give the same answers as base + adapter and generate faster
        return PeftModel.from_pretrained(base_model, TUNED).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(TUNED, dtype=base_model.dtype)


def generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int):
    """Greedy answers, batched by similar length with left padding."""
    import torch

    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for i, seq in zip(idx, out):
            answers[i] = tokenizer.decode(seq[enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def score(predictions: list[str], references: list[str], task: Task) -> dict[str, float]:
    import evaluate

    def load(name: str):
        return evaluate.load(str(METRIC_MODULES / f"{name}.py"), keep_in_memory=True)

    out = load("exact_match").compute(predictions=predictions, references=references)
    if task.answer_regex:
        out |= load("format_adherence").compute(predictions=predictions,
                                                answer_regex=task.answer_regex, labels=task.labels)
    if task.answer_regex and task.labels:
        out |= load("field_scores").compute(predictions=predictions, references=references,
                                            answer_regex=task.answer_regex, labels=task.labels)
    return {k: round(float(v), 4) for k, v in out.items()}


def main() -> None:
    params = load_params()
    cfg, task = params["eval"], Task.from_params(params)
    inputs = {"test": md5_path(TEST), "base": md5_path(BASE), "tuned": md5_path(TUNED)}
    # evaluate copies metric modules into HF_HOME; keep that out of the user's home
    os.environ.setdefault("HF_HOME", str(Path(tempfile.gettempdir()) / "llm-finetune-hf"))

    with tracking.stage_run("evaluate", params, ["eval", "task"], inputs) as run:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        rows = read_jsonl(TEST)
        if cfg.get("max_examples"):
            rows = rows[: int(cfg["max_examples"])]
        tokenizer = AutoTokenizer.from_pretrained(BASE)
        prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False,
                                                 add_generation_prompt=True) for r in rows]
        references = [r["messages"][-1]["content"] for r in rows]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32

        answers, seconds = {}, {}
        base_model = AutoModelForCausalLM.from_pretrained(BASE, dtype=dtype).to(device)
        for name in ("base", "tuned"):
            model = base_model if name == "base" else load_tuned(base_model)
            start = time.perf_counter()
            answers[name] = generate(model, tokenizer, prompts, int(cfg["batch_size"]),
                                     int(cfg["max_new_tokens"]))
            seconds[name] = round(time.perf_counter() - start, 1)

        metrics = {name: score(answers[name], references, task) for name in answers}
        metrics["delta"] = {k: round(metrics["tuned"][k] - metrics["base"][k], 4)
                            for k in metrics["base"]}
        metrics["n_examples"] = len(rows)
        metrics["generation_seconds"] = seconds
        write_json(METRICS, metrics)

        predictions = []
        for r, reference, base, tuned in zip(rows, references, answers["base"], answers["tuned"]):
            user = next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
            predictions.append({
                "id": r["id"], "source": r["source"], "line": r["line"], "input": user,
                "reference": reference, "base": base, "tuned": tuned,
                "base_exact": base == reference, "tuned_exact": tuned == reference,
                "base_format": task.follows_format(base), "tuned_format": task.follows_format(tuned),
            })
        write_jsonl(PREDICTIONS, predictions)
        bars = ["metric,model,value"] + [f"{k},{name},{metrics[name][k]}"
                                         for name in ("base", "tuned") for k in metrics[name]]
        write_text(PLOT, "\n".join(bars) + "\n")

        import wandb

        run.summary.update({f"eval/{name}/{k}": v for name in ("base", "tuned", "delta")
                            for k, v in metrics[name].items()})
        columns = ["input", "reference", "base", "tuned", "base_exact", "tuned_exact"]
        run.log({"eval/predictions": wandb.Table(
            columns=columns, data=[[p[c] for c in columns] for p in predictions])})
        summary = ", ".join(f"{k} {metrics['base'][k]:.2f} -> {metrics['tuned'][k]:.2f}"
                            for k in ("format_adherence", "exact_match") if k in metrics["base"])
        print(f"evaluate: {len(rows)} test examples; {summary}")


def _strip(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


if __name__ == "__main__":
    run_stage(main)
