"""train: which tokens carry loss for every record kind; every method and objective runs and
writes an adapter (or model), a pre-flight plan and loss curves; gradient accumulation equals a
bigger batch; two DDP processes equal one; a run killed with SIGKILL resumes to the same weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, set_params, switch_method
from helpers import ticket_rows, write_preference_splits

from stages import train
from stages.common.config import StageError
from stages.common.examples import IGNORE, chat_examples, text_example
from stages.common.files import read_jsonl, write_jsonl
from stages.common.kinds import canonical

SPLITS = ("train", "validation")

ANSWER = '{"urgency": "high", "category": "billing"}'


def params_of(root) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def report_of(root) -> dict:
    return json.loads((root / "reports/train.json").read_text())


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    )


# --- which tokens train ---------------------------------------------------------------------

RAW = {  # kind -> (raw row, the text that must carry loss, the eos token appended)
    "messages": (
        {
            "messages": [
                {"role": "system", "content": "Triage."},
                {"role": "user", "content": "Charged twice."},
                {"role": "assistant", "content": ANSWER},
            ]
        },
        [ANSWER],
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "human", "value": "Charged twice."},
                {"from": "gpt", "value": ANSWER},
            ]
        },
        [ANSWER],
    ),
    "alpaca": (
        {"instruction": "Triage this.", "input": "Charged twice.", "output": ANSWER},
        [ANSWER],
    ),
    "prompt_completion": ({"prompt": "Charged twice.", "completion": ANSWER}, [ANSWER]),
    # two answers: both train; an answer with weight 0 is context only
    "multi_turn": (
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "Charged twice."},
                {"role": "assistant", "content": ANSWER},
            ]
        },
        ["Hello, how can I help?", ANSWER],
    ),
    "weighted": (
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "weight": 0},
                {"role": "user", "content": "Charged twice."},
                {"role": "assistant", "content": ANSWER, "weight": 1},
            ]
        },
        [ANSWER],
    ),
}


@pytest.mark.parametrize("name", list(RAW))
def test_loss_only_on_answers_for_every_chat_kind(prepared, name):
    from transformers import AutoTokenizer

    raw, answers = RAW[name]
    kind = name if name in ("sharegpt", "alpaca", "prompt_completion") else "messages"
    fields, _ = canonical(kind, raw)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "models/base")
    template = (prepared / "models/base/chat_template_training.jinja").read_text()
    example = chat_examples(tokenizer, [fields["messages"]], template)[0]
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, example) == "".join(a + eos for a in answers)
    # the rest is the prompt, exactly as the shipped template renders it
    rendered = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in fields["messages"]], tokenize=False
    )
    assert tokenizer.decode(example["input_ids"]) == rendered
    everything = chat_examples(tokenizer, [fields["messages"]], template, train_on="all")[0]
    assert trained_text(tokenizer, everything) == rendered


def test_raw_text_trains_every_token_and_preference_only_completions(prepared, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared / "models/base")
    example = text_example(tokenizer, "Refunds take five days.")
    assert trained_text(tokenizer, example) == "Refunds take five days." + tokenizer.eos_token

    write_preference_splits(prepared)
    set_params(prepared, objective={"name": "dpo", "beta": 0.1, "loss_type": "sigmoid"})
    trainer = train.build_trainer(params_of(prepared), "fp32", str(tmp_path / "out"))
    row = trainer.train_dataset[0]
    source = read_jsonl(prepared / "data/processed/train.jsonl")[0]
    # DPO scores the completions: chosen and rejected token ids decode to the two answers
    assert tokenizer.decode(row["chosen_ids"]).startswith(source["chosen"][0]["content"])
    assert tokenizer.decode(row["rejected_ids"]).startswith(source["rejected"][0]["content"])
    assert source["prompt"][-1]["content"] in tokenizer.decode(row["prompt_ids"])


def test_every_training_row_has_trainable_tokens(prepared, tmp_path):
    trainer = train.build_trainer(params_of(prepared), "fp32", str(tmp_path / "out"))
    assert len(trainer.train_dataset) == 40  # no row lost
    assert all(any(label != IGNORE for label in row["labels"]) for row in trainer.train_dataset)
    rows = ticket_rows(2)
    rows[1]["messages"][-1]["weight"] = 0  # nothing left to learn from this row
    write_jsonl(prepared / "data/processed/train.jsonl", rows)
    with pytest.raises(StageError, match=r"raw.jsonl:2: no trainable tokens"):
        train.build_trainer(params_of(prepared), "fp32", str(tmp_path / "out"))


# --- the stage, per method and objective ------------------------------------------------------


def test_lora_run_writes_adapter_plan_report_and_curves(prepared):
    train.main()
    tuned = prepared / "models/tuned"
    assert (tuned / "adapter_config.json").exists()
    assert (tuned / "adapter_model.safetensors").exists()
    modules = json.loads((tuned / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules)  # byte-stable output, whatever the hash seed
    report = report_of(prepared)
    assert report["optimizer_steps"] == 4 and report["precision"] == "fp32"
    assert report["resumed"] is False and report["resumed_from_step"] is None
    plan = report["plan"]
    assert 0 < plan["parameters"]["trainable"] < plan["parameters"]["total"]
    assert plan["optimizer_steps"] == 4 and plan["effective_batch"] == 4
    assert plan["tokens_per_epoch"] > 40 * 20 and plan["estimated_seconds_per_step"] > 0
    assert plan["estimated_peak_memory_gib"] > 0
    assert report["eval_loss"] is not None and report["final_train_loss"] > 0
    assert report["best_step"] in (2, 4)
    train_curve = (prepared / "reports/plots/train_loss.csv").read_text().splitlines()
    eval_curve = (prepared / "reports/plots/eval_loss.csv").read_text().splitlines()
    assert train_curve[0] == "step,loss" and len(train_curve) == 5  # logging_steps=1
    assert len(eval_curve) == 3  # eval_steps=2 over 4 steps
    # checkpoints of a finished run are cleared; only the run marker stays
    assert [p.name for p in (prepared / "models/checkpoints").iterdir()] == ["run.json"]


@pytest.mark.parametrize("method", ["full", "dora", "qlora", "prefix", "prompt", "ia3"])
def test_methods(prepared, method):
    switch_method(prepared, method, **{"train.max_steps": 2})
    train.main()
    report = report_of(prepared)
    assert report["method"] == method and report["optimizer_steps"] == 2
    tuned = prepared / "models/tuned"
    if method == "full":
        assert report["parameters"]["trainable"] == report["parameters"]["total"]
        assert (tuned / "model.safetensors").exists()
    else:
        config = json.loads((tuned / "adapter_config.json").read_text())
        peft_type = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING", "ia3": "IA3"}
        assert config["peft_type"] == peft_type.get(method, "LORA")
        assert config.get("use_dora", False) is (method == "dora")
        assert (tuned / "adapter_model.safetensors").exists()
        assert 0 < report["parameters"]["trainable"] < report["parameters"]["total"]
        assert report["final_train_loss"] > 0


def test_dpo_objective(prepared):
    write_preference_splits(prepared)
    set_params(prepared, objective={"name": "dpo", "beta": 0.1, "loss_type": "sigmoid"})
    train.main()
    report = report_of(prepared)
    assert report["objective"] == "dpo" and report["optimizer_steps"] == 4
    assert (prepared / "models/tuned/adapter_model.safetensors").exists()
    assert report["eval_loss"] is not None


def preference_scores(root, records) -> list[tuple[float, float]]:
    """(chosen, rejected) scores of the reward model in models/tuned on each record."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from stages.common import tuned

    tokenizer = AutoTokenizer.from_pretrained(root / "models/base")
    base = tuned.load_reward_base(root / "models/base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, root / "models/tuned")
    pairs = [
        tuned.conversation_ids(tokenizer, r["prompt"] + r[side])
        for r in records
        for side in ("chosen", "rejected")
    ]
    scores = tuned.reward_scores(model, pairs, tokenizer.pad_token_id, batch_size=8)
    return list(zip(scores[0::2], scores[1::2]))


def test_reward_model_ranks_chosen_over_rejected_after_training(prepared):
    """objective=reward: a score head on the base, trained on a separable toy set (the chosen
    answer is the task's JSON, the rejected one prose), ranks chosen first on unseen pairs."""
    write_preference_splits(prepared)
    set_params(
        prepared,
        **{"objective": {"name": "reward"}, "train.max_steps": 30, "train.eval_steps": 10},
    )
    train.main()
    report = report_of(prepared)
    assert report["objective"] == "reward" and report["optimizer_steps"] == 30
    adapter = json.loads((prepared / "models/tuned/adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS"
    held_out = read_jsonl(prepared / "data/processed/validation.jsonl")
    scores = preference_scores(prepared, held_out)
    assert sum(chosen > rejected for chosen, rejected in scores) == len(held_out)


def test_reward_model_refuses_prompt_learning_methods(prepared):
    write_preference_splits(prepared)
    switch_method(prepared, "prefix", objective={"name": "reward"})
    with pytest.raises(StageError, match="reward model .* method=lora"):
        train.main()


def test_grpo_rewards_score_good_and_bad_answers_by_the_task_metrics(prepared):
    """GRPO's verifiable rewards are the task's per-example metrics: the reference scores 1 on
    both, a valid answer with a wrong label keeps format but not exact match, prose scores 0."""
    from stages.common.task import Task

    params = params_of(prepared)
    task = Task.from_params(params)
    funcs, weights = train.reward_functions(
        {"rewards": {"format_adherence": 1.0, "exact_match": 0.5}, "reward_model": None}, task
    )
    assert [f.__name__ for f in funcs] == ["format_adherence", "exact_match"]
    assert weights == [1.0, 0.5]
    wrong_label = '{"urgency": "low", "category": "billing"}'
    completions = [[{"role": "assistant", "content": a}] for a in (ANSWER, wrong_label, "hi")]
    references = [ANSWER] * 3
    assert funcs[0](completions, references) == [1.0, 1.0, 0.0]
    assert funcs[1](completions, references) == [1.0, 0.0, 0.0]
    with pytest.raises(StageError, match="no reward 'politeness'"):
        train.reward_functions({"rewards": {"politeness": 1.0}, "reward_model": None}, task)
    with pytest.raises(StageError, match="needs objective.reward_model"):
        train.reward_functions({"rewards": {"reward_model": 1.0}, "reward_model": None}, task)


def test_grpo_objective_runs_rl_after_sft(prepared):
    """objective=grpo: the SFT phase, then a few GRPO steps on the train prompts from it; the
    report says what the rewards were. Replay rows (general chat) train the SFT phase only."""
    train_split = prepared / "data/processed/train.jsonl"
    general = (
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
    )
    write_jsonl(
        train_split, read_jsonl(train_split) + [{"messages": list(general), "replay": True}]
    )
    set_params(
        prepared,
        objective={
            "name": "grpo",
            "train_on": "assistant",
            "steps": 2,
            "learning_rate": 1e-4,
            "prompts_per_step": 2,
            "num_generations": 2,
            "max_completion_length": 8,
            "temperature": 1.0,
            "beta": 0.0,
            "rewards": {"format_adherence": 1.0, "exact_match": 1.0},
            "reward_model": None,
        },
    )
    train.main()
    report = report_of(prepared)
    assert report["objective"] == "grpo" and report["optimizer_steps"] == 4  # the SFT phase
    grpo = report["grpo"]
    assert grpo["steps"] == 2 and grpo["prompts"] == 40
    assert grpo["rewards"] == {"format_adherence": 1.0, "exact_match": 1.0}
    assert set(grpo["per_reward_last"]) == {"format_adherence", "exact_match"}
    assert 0 <= grpo["reward_last"] <= 2
    assert (prepared / "models/tuned/adapter_model.safetensors").exists()


def test_grpo_rewarded_by_a_reward_model(prepared):
    """The RLHF path: a reward model (objective=reward, exported), then GRPO from the SFT model
    with that model as one of its rewards; the report names it by its folder."""
    from conftest import declare_dependency
    from helpers import write_preference_splits

    from stages import export

    chat_splits = {n: (prepared / f"data/processed/{n}.jsonl").read_bytes() for n in SPLITS}
    write_preference_splits(prepared)
    set_params(prepared, **{"objective": {"name": "reward"}, "export.check_examples": 2})
    train.main()
    shutil.copy(
        prepared / "data/processed/validation.jsonl", prepared / "data/processed/test.jsonl"
    )
    export.main()
    shutil.copytree(prepared / "models/merged", prepared / "models/reward")
    for name, data in chat_splits.items():
        (prepared / f"data/processed/{name}.jsonl").write_bytes(data)
    grpo = yaml.safe_load((ROOT / "conf/objective/grpo.yaml").read_text())["objective"]
    grpo |= {"steps": 1, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 8}
    grpo |= {"rewards": {"format_adherence": 1.0, "reward_model": 0.5}}
    set_params(prepared, objective=grpo | {"reward_model": "models/reward"})
    with pytest.raises(StageError, match="objective.reward_model"):  # not declared yet
        train.main()
    declare_dependency(prepared, "train", Path("models/reward"))
    train.main()
    report = report_of(prepared)["grpo"]
    assert report["rewards"] == {"format_adherence": 1.0, "reward_model": 0.5}
    assert set(report["per_reward_last"]) == {"format_adherence", "reward_model"}
    assert all(v == v for v in report["per_reward_last"].values())  # logged: not NaN


def test_cpt_objective_packs_raw_text(prepared):
    texts = [
        {
            "id": str(i),
            "source": "t.jsonl",
            "line": i + 1,
            "kind": "text",
            "text": r["messages"][1]["content"] * 3,
        }
        for i, r in enumerate(ticket_rows())
    ]
    write_jsonl(prepared / "data/processed/train.jsonl", texts[:40])
    write_jsonl(prepared / "data/processed/validation.jsonl", texts[40:48])
    set_params(
        prepared, **{"objective": {"name": "cpt"}, "train.packing": True, "train.max_length": 64}
    )
    train.main()
    report = report_of(prepared)
    assert report["objective"] == "cpt"
    # packed into 64-token windows: long documents split, short pieces sharing windows,
    # and not a token cut away
    lengths = [len(text_example_ids(prepared, t["text"])) for t in texts[:40]]
    assert max(lengths) > 64
    assert report["plan"]["train_examples"] < sum(-(-n // 64) for n in lengths)
    assert report["plan"]["tokens_per_epoch"] == sum(lengths)


def text_example_ids(root, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "models/base")
    return text_example(tokenizer, text)["input_ids"]


def test_objective_and_data_must_agree(prepared):
    write_jsonl(
        prepared / "data/processed/train.jsonl",
        [{"id": "x", "source": "raw.jsonl", "line": 3, "kind": "text", "text": "hello"}],
    )
    with pytest.raises(
        StageError,
        match=r"objective=sft trains on chat .* found a 'text' "
        r"record \(line 3 of raw.jsonl\)",
    ):
        train.main()


def relabel(rows, answer):
    return [
        {**r, "messages": [*r["messages"][:2], {"role": "assistant", "content": answer}]}
        for r in rows
    ]


def test_early_stopping_keeps_the_best_checkpoint(prepared):
    # training teaches one answer, validation wants another: once the shared format is
    # learned, validation loss can only climb, and training must stop at its best point
    rows = ticket_rows()
    write_jsonl(
        prepared / "data/processed/train.jsonl",
        relabel(rows[:40], '{"urgency": "low", "category": "billing"}'),
    )
    write_jsonl(
        prepared / "data/processed/validation.jsonl",
        relabel(rows[40:48], '{"urgency": "critical", "category": "product"}'),
    )
    set_params(
        prepared,
        **{
            "train.learning_rate": 1e-2,
            "train.max_steps": 40,
            "train.eval_steps": 2,
            "train.early_stopping_patience": 2,
            "train.warmup_steps": 0.0,
            "train.lr_scheduler_type": "constant",
        },
    )
    train.main()
    report = report_of(prepared)
    evals = [
        float(line.split(",")[1])
        for line in (prepared / "reports/plots/eval_loss.csv").read_text().splitlines()[1:]
    ]
    assert report["stopped_early"] and report["optimizer_steps"] < 40
    assert report["eval_loss"] == pytest.approx(min(evals), abs=1e-4)
    assert report["best_step"] == 2 * (1 + evals.index(min(evals)))


# --- equivalences: accumulation, DDP, resume ---------------------------------------------------


def adapter_weights(root):
    from safetensors.torch import load_file

    return load_file(root / "models/tuned/adapter_model.safetensors")


def assert_same_weights(a, b, atol):
    import torch

    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)


def test_gradient_accumulation_equals_a_bigger_batch(prepared):
    # the same rows in the same order: plain random sampling (length grouping forms its
    # groups per batch size)
    common = {
        "train.max_steps": 3,
        "train.eval_steps": 100,
        "train.warmup_steps": 0.0,
        "train.train_sampling_strategy": "random",
    }
    set_params(
        prepared,
        **common,
        **{"train.per_device_train_batch_size": 8, "train.gradient_accumulation_steps": 1},
    )
    train.main()
    big_batch, big_loss = adapter_weights(prepared), report_of(prepared)["train_loss"]
    set_params(
        prepared,
        **common,
        **{"train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 4},
    )
    train.main()
    assert report_of(prepared)["plan"]["effective_batch"] == 8
    assert report_of(prepared)["train_loss"] == pytest.approx(big_loss, rel=1e-4)
    assert_same_weights(adapter_weights(prepared), big_batch, atol=1e-5)


def run_stage_process(root, env_extra=None, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    return proc


# four optimizer steps, one per batch, in a seeded order: runs of 1 and 2 processes compare
SAME_RUN = {
    "train.max_steps": 4,
    "train.eval_steps": 100,
    "train.warmup_steps": 0.0,
    "train.gradient_accumulation_steps": 1,
    "train.train_sampling_strategy": "random",
}


def test_two_ddp_processes_match_one_with_the_same_global_batch(prepared):
    set_params(prepared, **SAME_RUN, **{"train.per_device_train_batch_size": 4})
    train.main()
    single = (prepared / "reports/plots/train_loss.csv").read_text().splitlines()[1:]
    single_weights = adapter_weights(prepared)
    set_params(
        prepared, **SAME_RUN, **{"train.per_device_train_batch_size": 2, "launch.num_processes": 2}
    )
    run_stage_process(prepared)
    report = report_of(prepared)
    assert report["plan"]["processes"] == 2 and report["plan"]["effective_batch"] == 4
    ddp = (prepared / "reports/plots/train_loss.csv").read_text().splitlines()[1:]
    assert len(ddp) == len(single) == 4
    for a, b in zip(single, ddp):
        assert float(a.split(",")[1]) == pytest.approx(float(b.split(",")[1]), rel=1e-4)
    assert_same_weights(adapter_weights(prepared), single_weights, atol=1e-4)


def test_two_nodes_of_one_process_match_one_process_with_the_same_global_batch(prepared):
    """Multi-node on loopback: two "nodes" of one process each (NODE_RANK 0 and 1, the same
    project as on a shared filesystem) meet at launch.rdzv_endpoint and train over gloo; the
    weights equal one process's with the same global batch."""
    set_params(prepared, **SAME_RUN, **{"train.per_device_train_batch_size": 4})
    train.main()
    single_weights = adapter_weights(prepared)
    with socket.socket() as s:  # a free port for node 0's rendezvous store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = {
        "launch.name": "ddp",
        "launch.config_file": "conf/accelerate/ddp.yaml",
        "launch.num_processes": 1,
        "launch.nodes": 2,
        "launch.rdzv_endpoint": f"127.0.0.1:{port}",
    }
    set_params(prepared, **SAME_RUN, **nodes, **{"train.per_device_train_batch_size": 2})
    second = run_stage_process(prepared, wait=False, env_extra={"NODE_RANK": "1"})
    run_stage_process(prepared, env_extra={"NODE_RANK": "0"})
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert "on node 1 of 2" in out
    report = report_of(prepared)
    assert report["plan"]["processes"] == 2 and report["plan"]["effective_batch"] == 4
    assert_same_weights(adapter_weights(prepared), single_weights, atol=1e-4)


def test_several_nodes_need_a_distributed_launch_and_a_rendezvous(prepared, monkeypatch):
    set_params(prepared, **{"launch.nodes": 2})
    with pytest.raises(StageError, match="launch=single: choose a distributed launch"):
        train.main()
    set_params(prepared, **{"launch.name": "ddp", "launch.config_file": "conf/accelerate/ddp.yaml"})
    with pytest.raises(StageError, match="set launch.rdzv_endpoint to host:port of node 0"):
        train.main()
    set_params(prepared, **{"launch.rdzv_endpoint": "127.0.0.1:29500"})
    monkeypatch.setenv("NODE_RANK", "2")
    with pytest.raises(StageError, match=r"NODE_RANK='2': give each of the 2 nodes one of 0..1"):
        train.main()


def test_killed_run_resumes_to_the_same_weights(prepared):
    set_params(
        prepared,
        **{"train.max_steps": 16, "train.eval_steps": 2, "train.per_device_train_batch_size": 4},
    )
    train.main()
    uninterrupted = adapter_weights(prepared)
    shutil.rmtree(prepared / "models/tuned")
    (prepared / "models/checkpoints/run.json").unlink()  # forget the finished run

    proc = run_stage_process(prepared, wait=False)
    deadline = time.time() + 300
    while not (prepared / "models/checkpoints/checkpoint-6/trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (prepared / "models/tuned").exists()

    run_stage_process(prepared)
    report = report_of(prepared)
    assert report["resumed"] and report["resumed_from_step"] >= 6
    assert report["optimizer_steps"] == 16
    assert_same_weights(adapter_weights(prepared), uninterrupted, atol=1e-6)


def test_a_non_finite_loss_stops_training_with_one_line(prepared):
    from transformers import TrainerState, TrainingArguments

    callback = train.stop_on_non_finite_loss()
    state, args = TrainerState(), TrainingArguments(output_dir=str(prepared / "x"), use_cpu=True)
    state.global_step = 7
    callback.on_log(args, state, None, logs={"loss": 1.5, "grad_norm": 0.3})  # finite: goes on
    for key in ("loss", "eval_loss", "grad_norm"):
        with pytest.raises(StageError, match=f"training diverged: {key}=(nan|inf) at step 7"):
            callback.on_log(args, state, None, logs={key: float("nan" if key != "loss" else "inf")})
    trainer = train.build_trainer(params_of(prepared), "fp32", str(prepared / "out"))
    assert any(
        type(c).__name__ == "StopOnNonFiniteLoss" for c in trainer.callback_handler.callbacks
    )


def test_checkpoint_fingerprint_covers_params_inputs_code_and_packages(prepared, monkeypatch):
    from importlib import metadata

    params, inputs = params_of(prepared), {"train": "a", "validation": "b", "base": "c"}
    before = train.run_fingerprint(params, inputs)
    assert train.run_fingerprint(params, inputs) == before  # deterministic
    assert train.run_fingerprint({**params, "seed": 1}, inputs) != before
    assert train.run_fingerprint(params, {**inputs, "train": "z"}) != before
    real_version = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "9.9" if name == "peft" else real_version(name)
    )
    assert train.run_fingerprint(params, inputs) != before  # an upgrade: no resume
    monkeypatch.undo()
    real_md5 = train.md5_path
    monkeypatch.setattr(
        train, "md5_path", lambda p: "fixed" if Path(p).name == "train.py" else real_md5(p)
    )
    assert train.run_fingerprint(params, inputs) != before  # a code change: no resume


def watch_loss_calls(trainer, monkeypatch, look) -> list:
    """What `look(model, inputs)` saw at each of the trainer's loss computations."""
    seen = []
    compute_loss = trainer.compute_loss

    def watched(model, inputs, **kw):
        seen.append(look(model, inputs))
        return compute_loss(model, inputs, **kw)

    monkeypatch.setattr(trainer, "compute_loss", watched)
    return seen


def test_preflight_measures_the_longest_batch_and_stops_a_run_that_cannot_fit(
    prepared, monkeypatch
):
    from stages.common import memory

    rows = ticket_rows(40)
    long_row = rows[7]["messages"][1]  # one user turn ~3x the others: the memory peak
    long_row["content"] = " ".join([long_row["content"]] * 3)
    write_jsonl(prepared / "data/processed/train.jsonl", rows)
    set_params(prepared, **{"train.max_length": 1024})
    trainer = train.build_trainer(params_of(prepared), "fp32", str(prepared / "out"))
    longest = max(len(ids) for ids in trainer.train_dataset["input_ids"])
    widths = watch_loss_calls(
        trainer, monkeypatch, lambda model, inputs: inputs["input_ids"].shape[1]
    )
    plan = train.preflight(trainer, 1)
    # the warm-up batches for time, then a batch of the longest rows for memory
    assert len(widths) == train.WARMUP_BATCHES + 1 and widths[-1] == longest
    assert plan["estimated_peak_memory_gib"] > 0

    # the same plan on a machine with 1 MiB free: one line before the first step, no output
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 2**20)
    monkeypatch.setattr(memory, "held_bytes", lambda device="cpu": 0)
    with pytest.raises(
        StageError,
        match=r"^train needs ~[\d.]+ GiB on cpu \(model and longest "
        r"batch \(measured\) [\d.]+, optimizer state [\d.]+\) "
        r"but 0.0 GiB is available; lower train\.per_device",
    ):
        train.main()
    assert not (prepared / "models/tuned").exists()


def test_preflight_measures_with_activation_checkpointing_as_training_runs(prepared, monkeypatch):
    """Trainer turns activation checkpointing on only in train(); the plan's memory is measured
    with it on, or a checkpointed run is planned at the memory of an unchecked one."""
    import torch

    set_params(prepared, **{"train.activation_checkpointing": True})
    trainer = train.build_trainer(params_of(prepared), "fp32", str(prepared / "out"))
    assert not trainer.model.is_activation_checkpointing  # not yet: train() would do it
    seen = watch_loss_calls(
        trainer, monkeypatch, lambda model, inputs: model.is_activation_checkpointing
    )
    train.preflight(trainer, 1)
    assert seen and all(seen)

    # a device too small for even one batch of the longest rows: one line, not a traceback
    def out_of_memory(model, inputs, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.\nmore")

    monkeypatch.setattr(trainer, "compute_loss", out_of_memory)
    with pytest.raises(
        StageError,
        match=r"a batch of the data does not fit on cuda .* Tried to allocate 9.00 GiB.\); lower",
    ):
        train.preflight(trainer, 1)


# --- the steps, directly ----------------------------------------------------------------------


def test_train_settings_pass_to_the_trainer_under_their_own_names():
    """Every train.* key the trainer config takes passes as it is; the stage resolves the
    `auto` ones, and SFT-only keys never reach DPOConfig."""
    import dataclasses

    from trl import DPOConfig, SFTConfig

    cfg = yaml.safe_load((ROOT / "conf/train/default.yaml").read_text())
    sft = train.trainer_settings(cfg, SFTConfig)
    dpo = train.trainer_settings(cfg, DPOConfig)
    assert sft["learning_rate"] == cfg["learning_rate"] and sft["warmup_steps"] == 0.1
    assert sft["train_sampling_strategy"] == "random" and "packing" in sft
    assert not set(sft) & train.RESOLVED_HERE and not set(dpo) & train.SFT_ONLY
    ours = set(cfg) - set(sft)  # the stage's own keys: no trainer argument has their name
    sft_names = {f.name for f in dataclasses.fields(SFTConfig)}
    # precision becomes bf16/fp16, attention a model load argument, patience a callback
    assert ours - train.RESOLVED_HERE == {
        "precision",
        "attn_implementation",
        "early_stopping_patience",
    }
    assert not (ours - train.RESOLVED_HERE) & sft_names


def test_loss_curves_are_csv_of_train_and_eval_loss():
    history = [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5}, {"step": 10, "eval_loss": 1.7}]
    assert train.loss_curves(history) == ("step,loss\n5,2.0\n10,1.5\n", "step,loss\n10,1.7\n")


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "ia3"])
def test_trainer_loss_is_the_models_own_loss(prepared, method):
    """The trainer's loss on a batch (TRL's, with our CPU fast path) equals the loss the PEFT
    model computes itself from the same labels: virtual tokens shift nothing."""
    import torch

    from stages.common import compat

    switch_method(prepared, method)
    trainer = train.build_trainer(params_of(prepared), "fp32", str(prepared / "out"))
    batch = compat.prepare_inputs(trainer, next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch)).item()
        own = trainer.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
        ).loss.item()
    assert ours == pytest.approx(own, rel=1e-4)
