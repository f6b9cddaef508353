"""evaluate: local metric modules score correctly; the stage writes base and tuned side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

import evaluate
import pytest
import yaml
from conftest import ROOT, set_params

from stages import evaluate as evaluate_stage
from stages.common.config import StageError
from stages.common.files import read_jsonl, write_jsonl
from stages.common.records import set_hash

METRICS = Path(evaluate_stage.__file__).parent / "metrics"
REGEX = r'\{"urgency": "(?P<urgency>[a-z_]+)", "category": "(?P<category>[a-z_]+)"\}'
LABELS = {"urgency": ["low", "high"], "category": ["billing", "account"]}


def load(name):
    return evaluate.load(str(METRICS / f"{name}.py"), keep_in_memory=True)


def test_metric_modules():
    refs = [
        '{"urgency": "low", "category": "billing"}',
        '{"urgency": "high", "category": "account"}',
        '{"urgency": "high", "category": "billing"}',
        '{"urgency": "low", "category": "account"}',
    ]
    preds = [
        refs[0],
        '{"urgency": "low", "category": "account"}',
        "High urgency, billing.",
        '{"urgency": "low", "category": "sales"}',
    ]
    # corpus values, and per-example scores for the metrics that are means over examples
    assert load("exact_match").compute(predictions=preds, references=refs) == {
        "exact_match": 0.25,
        "per_example": {"exact_match": [1.0, 0.0, 0.0, 0.0]},
    }
    fmt = load("format_adherence").compute(predictions=preds, answer_regex=REGEX, labels=LABELS)
    assert fmt == {
        "format_adherence": 0.5,  # prose fails the regex, "sales" is not a label
        "per_example": {"format_adherence": [1.0, 1.0, 0.0, 0.0]},
    }
    fields = load("field_scores").compute(
        predictions=preds, references=refs, answer_regex=REGEX, labels=LABELS
    )
    assert fields["urgency_accuracy"] == 0.5 and fields["category_accuracy"] == 0.5
    assert fields["per_example"]["urgency_accuracy"] == [1.0, 0.0, 0.0, 1.0]
    assert "urgency_macro_f1" not in fields["per_example"]  # corpus-level
    # urgency: low P=2/3 R=2/2 -> F1 0.8; high never predicted -> 0; macro 0.4
    assert fields["urgency_macro_f1"] == pytest.approx(0.4)


def test_stage_scores_base_and_tuned_on_same_prompts(prepared):
    from stages import export, train

    train.main()
    test_rows = read_jsonl(prepared / "data/processed/validation.jsonl")
    write_jsonl(prepared / "data/processed/test.jsonl", test_rows)
    export.main()
    evaluate_stage.main()
    metrics = json.loads((prepared / "reports/metrics.json").read_text())
    assert (
        set(metrics["base"])
        == set(metrics["tuned"])
        >= {
            "format_adherence",
            "exact_match",
            "urgency_accuracy",
            "category_macro_f1",
            "test_loss",
            "perplexity",
        }
    )
    for name in ("base", "tuned"):
        rates = {k: v for k, v in metrics[name].items() if k not in ("test_loss", "perplexity")}
        assert all(0 <= v <= 1 for v in rates.values())
        assert metrics[name]["perplexity"] == pytest.approx(
            math.exp(metrics[name]["test_loss"]), rel=1e-3
        )
    # training lowered the loss of the answers it was trained on (validation rows, reused)
    assert metrics["tuned"]["test_loss"] < metrics["base"]["test_loss"]
    forgetting = metrics["forgetting"]
    assert forgetting["examples"] == 40
    assert forgetting["loss_delta"] == pytest.approx(
        forgetting["tuned_loss"] - forgetting["base_loss"], abs=1e-3
    )
    # one confusion matrix per model and label field, one row per test example
    for name in ("base", "tuned"):
        for field in ("urgency", "category"):
            lines = (
                (prepared / f"reports/plots/confusion/{name}_{field}.csv").read_text().splitlines()
            )
            assert lines[0] == "actual,predicted" and len(lines) == 1 + 8
    assert metrics["delta"]["exact_match"] == pytest.approx(
        metrics["tuned"]["exact_match"] - metrics["base"]["exact_match"], abs=1e-4
    )
    predictions = read_jsonl(prepared / "reports/predictions.jsonl")
    assert len(predictions) == metrics["n_examples"] == 8
    assert {"input", "reference", "base", "tuned", "scores"} <= set(predictions[0])
    # the per-example scores the regression gate resamples add up to the metrics
    for name in ("base", "tuned"):
        scores = [p["scores"][name] for p in predictions]
        for metric in ("exact_match", "format_adherence", "urgency_accuracy"):
            assert sum(s[metric] for s in scores) / len(scores) == pytest.approx(
                metrics[name][metric], abs=1e-4
            )
        assert sum(s["loss_sum"] for s in scores) / sum(s["loss_tokens"] for s in scores) == (
            pytest.approx(metrics[name]["test_loss"], abs=1e-3)
        )
    assert metrics["test_set"] == {
        "examples": 8,
        "sha256": set_hash(read_jsonl(prepared / "data/processed/test.jsonl")),
    }


def test_batched_generation_matches_one_at_a_time(prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared / "models/base")
    model = AutoModelForCausalLM.from_pretrained(prepared / "models/base")
    rows = read_jsonl(prepared / "data/processed/validation.jsonl")
    prompts = [
        tokenizer.apply_chat_template(
            r["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        for r in rows
    ]
    batched, cut = evaluate_stage.generate(
        model, tokenizer, prompts, batch_size=4, max_new_tokens=8
    )
    single = [evaluate_stage.generate(model, tokenizer, [p], 1, 8)[0][0] for p in prompts]
    assert batched == single
    assert cut == len(prompts)  # a random model never reaches its stop token in 8 tokens


def test_free_text_metrics():
    refs = ["the refund was issued today", "please reset my password"]
    preds = ["the refund was issued today", "reset the password please"]
    rouge = load("rouge_l").compute(predictions=preds, references=refs)["rouge_l"]
    assert 0.5 < rouge < 1.0  # one perfect, one partial overlap
    assert load("bleu").compute(predictions=refs, references=refs)["bleu"] == pytest.approx(1.0)
    assert load("bleu").compute(predictions=preds, references=refs)["bleu"] < 1.0


def test_format_adherence_by_json_schema():
    schema = {
        "type": "object",
        "required": ["label"],
        "properties": {"label": {"enum": ["spam", "ham"]}},
    }
    preds = ['{"label": "spam"}', '{"label": "eggs"}', "spam"]
    assert load("format_adherence").compute(predictions=preds, answer_schema=schema) == {
        "format_adherence": pytest.approx(1 / 3),
        "per_example": {"format_adherence": [1.0, 0.0, 0.0]},
    }


def test_forgetting_gate_fails_the_stage(prepared):
    from conftest import set_params

    from stages import export, train

    train.main()
    write_jsonl(
        prepared / "data/processed/test.jsonl",
        read_jsonl(prepared / "data/processed/validation.jsonl")[:2],
    )
    export.main()
    set_params(prepared, **{"eval.max_forgetting": -100.0})  # no model can pass this
    with pytest.raises(StageError, match=r"forgetting gate: loss on the general set rose by"):
        evaluate_stage.main()
    assert "forgetting" in json.loads((prepared / "reports/metrics.json").read_text())


def test_the_task_config_chooses_the_metrics():
    from stages.common.task import Task

    conf = yaml.safe_load((ROOT / "conf/task/generic.yaml").read_text())
    generic = Task.from_params({"task": conf})
    assert generic.metrics == ["exact_match", "rouge_l", "bleu"]
    scores, per_example = generic.score(
        ["a refund was issued today"], ["a refund was issued today"]
    )
    assert scores == {"exact_match": 1.0, "rouge_l": 1.0, "bleu": pytest.approx(1.0, abs=1e-4)}
    assert per_example == {"exact_match": [1.0], "rouge_l": [1.0]}  # BLEU is corpus-level
    chosen = Task.from_params({"task": conf | {"metrics": ["rouge_l"]}})
    assert set(chosen.score(["x"], ["y"])[0]) == {"rouge_l"}


def test_tool_call_metric_reads_calls_in_the_common_formats():
    reference = '[{"arguments": {"order_id": "42"}, "name": "get_order"}]'  # as validate writes it
    preds = [
        '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "42"}}\n</tool_call>',
        '{"name": "get_order", "parameters": {"order_id": "42"}}',  # Llama 3.x
        '<tool_call>{"name": "get_order", "arguments": {"order_id": "7"}}</tool_call>',
        "Your order has shipped.",
    ]
    scores = load("tool_calls").compute(predictions=preds, references=[reference] * 4)
    assert scores["per_example"] == {
        "tool_name_match": [1.0, 1.0, 1.0, 0.0],
        "tool_call_match": [1.0, 1.0, 0.0, 0.0],
    }
    # an answer in words matches a reference that calls nothing
    words = load("tool_calls").compute(predictions=["Shipped."], references=["It shipped."])
    assert words["tool_call_match"] == 1.0


def test_test_loss_is_the_same_in_memory_bounded_chunks(prepared, monkeypatch):
    """Test loss computed in tiny chunks (a few logits at a time, one text per batch) equals
    the loss from the full logits of one batch: the bounds cost time, never the result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared / "models/base")
    model = AutoModelForCausalLM.from_pretrained(prepared / "models/base")
    records = read_jsonl(prepared / "data/processed/validation.jsonl")
    examples = evaluate_stage.loss_examples(records, tokenizer)
    examples.append(
        {
            "input_ids": examples[0]["input_ids"] * 3,  # a long text, every token
            "labels": examples[0]["input_ids"] * 3,
        }
    )
    full = evaluate_stage.test_loss(model, examples, 64, tokenizer.pad_token_id)

    expected = []
    for e in examples:  # the plain way: every logit of one text at once
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0].float()
        labels = torch.tensor(e["labels"])
        nll = torch.nn.functional.cross_entropy(
            logits[:-1], labels[1:], ignore_index=-100, reduction="sum"
        )
        expected.append(nll.item())
    assert full["sums"] == pytest.approx(expected, rel=1e-4)

    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(evaluate_stage, "LOGITS_BUDGET", vocab * 3)  # 3 positions per pass
    monkeypatch.setattr(evaluate_stage, "TOKEN_BUDGET", 16)
    chunked = evaluate_stage.test_loss(model, examples, 64, tokenizer.pad_token_id)
    assert chunked["sums"] == pytest.approx(full["sums"], rel=1e-4)
    assert (
        chunked["counts"] == full["counts"]
        and chunked["counts"][-1] == len(examples[0]["input_ids"]) * 3 - 1
    )


def test_loss_batches_respect_every_bound():
    lengths, scored = [5, 40, 7, 300, 6, 8], [2, 30, 3, 299, 1, 4]
    batches = evaluate_stage.loss_batches(lengths, scored, batch_size=3, per_call=20)
    assert sorted(i for b in batches for i in b) == list(range(6))  # every example, once
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or (
            sum(scored[i] for i in batch) <= 20
            and len(batch) * max(lengths[i] for i in batch) <= evaluate_stage.TOKEN_BUDGET
        )
    assert [3] in batches and [1] in batches  # too long to share a pass


def test_memory_plan_counts_weights_cache_and_working_set(prepared, monkeypatch):
    from transformers import AutoConfig

    from stages.common import memory

    config = AutoConfig.from_pretrained(prepared / "models/base")
    text = config.get_text_config()
    kv_per_token = (
        2
        * text.num_hidden_layers
        * text.num_key_value_heads
        * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        * 4
    )
    plan = evaluate_stage.planned_memory(
        config,
        1000,
        4,
        batch_size=8,
        prompt_tokens=100,
        max_new_tokens=28,
        loss_tokens=50,
        loss_scored=10,
    )
    assert plan["weights"] == 4000 and plan["kv cache"] == 8 * 128 * kv_per_token
    # test loss: the logits of the scored positions of one batch (8 texts, 10 answer tokens
    # each), their copies, one layer's work over its 8 x 50 tokens
    assert plan["working set"] >= 3 * 4 * 8 * 10 * text.vocab_size
    assert plan["working set"] < 3 * 4 * 8 * 50 * text.vocab_size
    # a raw text past TOKEN_BUDGET, every token scored, runs alone and whole: more activations,
    # more logits...
    long_text = 4 * evaluate_stage.TOKEN_BUDGET
    longer = evaluate_stage.planned_memory(config, 1000, 4, 8, 100, 28, long_text, long_text)
    assert longer["working set"] > plan["working set"]
    # ... but never more than LOGITS_BUDGET logit values at once
    monkeypatch.setattr(evaluate_stage, "LOGITS_BUDGET", 1000)
    capped = evaluate_stage.planned_memory(config, 1000, 4, 8, 100, 28, long_text, long_text)
    assert longer["working set"] - capped["working set"] == 3 * 4 * (
        long_text * text.vocab_size - 1000
    )
    assert evaluate_stage.planned_memory(config, 1000, 4, 16, 100, 28, 50, 10)["kv cache"] == (
        2 * plan["kv cache"]
    )

    # a plan that cannot fit stops the stage before any model loads, in one line
    from stages import export, train

    train.main()
    write_jsonl(
        prepared / "data/processed/test.jsonl",
        read_jsonl(prepared / "data/processed/validation.jsonl")[:2],
    )
    export.main()
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2**20)
    loaded = []
    monkeypatch.setattr(
        "transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loaded.append(a)
    )
    with pytest.raises(
        StageError,
        match=r"^evaluate needs ~[\d.]+ GiB on cpu \(weights [\d.]+, "
        r"kv cache [\d.]+, working set [\d.]+\) but 0.0 GiB is "
        r"available; lower eval.batch_size",
    ):
        evaluate_stage.main()
    assert not loaded and not (prepared / "reports/metrics.json").exists()


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_unmerged_adapters_generate_and_score_as_they_train(prepared, method):
    """A prompt-learning adapter runs beside the base: its answers do not depend on batching,
    and test loss (logits only where labels are) equals the PEFT model's own loss."""
    import torch
    from conftest import switch_method
    from transformers import AutoTokenizer

    from stages import export, train
    from stages.common import tuned

    switch_method(prepared, method, **{"train.max_steps": 2, "export.check_examples": 2})
    train.main()
    rows = read_jsonl(prepared / "data/processed/validation.jsonl")
    write_jsonl(prepared / "data/processed/test.jsonl", rows)
    export.main()
    tokenizer = AutoTokenizer.from_pretrained(prepared / "models/merged")
    model = tuned.load(prepared / "models/merged", torch.float32, "cpu").eval()
    prompts = [
        tokenizer.apply_chat_template(
            r["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        for r in rows[:6]
    ]
    # PEFT shifts prefix tuning's positions past the prefix: batched answers are exact
    if method == "prefix":
        batched, _ = evaluate_stage.generate(model, tokenizer, prompts, 3, max_new_tokens=6)
        single = [evaluate_stage.generate(model, tokenizer, [p], 1, 6)[0][0] for p in prompts]
        assert batched == single
    else:  # prompt tuning: PEFT drops position ids, so evaluate answers one prompt at a time
        assert tuned.virtual_tokens(model) == 20

    examples = evaluate_stage.loss_examples(rows[:4], tokenizer)
    ours = evaluate_stage.test_loss(model, examples, 4, tokenizer.pad_token_id)
    for e, total, count in zip(examples, ours["sums"], ours["counts"]):
        with torch.inference_mode():
            own = model(
                input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])
            ).loss.item()
        assert total / count == pytest.approx(own, rel=1e-4)
    evaluate_stage.main()
    metrics = json.loads((prepared / "reports/metrics.json").read_text())
    assert metrics["tuned"]["test_loss"] != metrics["base"]["test_loss"]


def test_reward_model_is_scored_by_pairwise_accuracy(prepared):
    """A reward model (objective=reward) is not asked to answer: evaluate ranks each test pair,
    the base by its own likelihood of each answer, the reward model by its scores."""
    from helpers import write_preference_splits

    from stages import export, train

    write_preference_splits(prepared)
    set_params(prepared, **{"objective": {"name": "reward"}, "train.max_steps": 20})
    train.main()
    write_jsonl(
        prepared / "data/processed/test.jsonl",
        read_jsonl(prepared / "data/processed/validation.jsonl"),
    )
    export.main()
    evaluate_stage.main()
    metrics = json.loads((prepared / "reports/metrics.json").read_text())
    assert metrics["tuned"]["pairwise_accuracy"] == 1.0  # the toy pairs are separable
    assert metrics["tuned"]["mean_margin"] > 0
    assert 0 <= metrics["base"]["pairwise_accuracy"] <= 1
    assert metrics["per_example"] == ["pairwise_accuracy"] and metrics["n_examples"] == 8
    predictions = read_jsonl(prepared / "reports/predictions.jsonl")
    assert len(predictions) == 8
    assert sum(p["scores"]["tuned"]["pairwise_accuracy"] for p in predictions) == 8
    assert not list((prepared / "reports/plots/confusion").iterdir())  # no labels to confuse
