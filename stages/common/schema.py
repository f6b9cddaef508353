"""The typed schema of params.yaml: every key, its type and what values it allows.

The values (and every default) live in conf/; this module only says what a value may be.
`check(params)` runs when conf/ is composed (`make params`, `python -m stages.common.compose`)
and again when any stage starts (`load_params`), so a mistyped key, a wrong type, an
out-of-range number or an unknown choice stops before any work, in one line naming the key,
the value and what is allowed:

    params.yaml: train.precision='bf61': Input should be 'auto', 'fp32', 'bf16' or 'fp16'
    params.yaml: train.lerning_rate: unknown key (did you mean learning_rate?)

Sections with variants (method, objective) are tagged unions on their `name`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

METRIC_MODULES = Path(__file__).parents[1] / "metrics"  # task.metrics name files here

# the record kinds validate reads (stages/common/kinds.py maps each kind's fields)
RecordKind = Literal["messages", "sharegpt", "alpaca", "prompt_completion", "preference", "text"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
ConflictPolicy = Literal["drop_all", "majority", "first"]
LeakagePolicy = Literal["report", "remove"]
LengthPolicy = Literal["reject", "truncate", "drop"]
# transformers' SchedulerType values (tests/test_config.py fails when transformers changes them)
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
]
# sft: the answers only (weight-0 turns skipped) | every token
TrainOn = Literal["assistant", "all"]
# TRL's DPOConfig.loss_type values (listed in its help text)
DpoLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]

Number = int | float  # an int stays an int (alpha: 32 is not rewritten as 32.0)
Positive = Annotated[int, Field(gt=0)]
Fraction = Annotated[Number, Field(ge=0, le=1)]
Path_ = Annotated[str, Field(min_length=1)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]  # a variable's name
# what a red-team answer must do (stages/common/task.py checks each)
SafetyCheck = Literal["format", "refusal", "no_leak", "no_personal_data"]


class Section(BaseModel):
    """Every section: unknown keys are refused, types are checked (a YAML string such as
    `1e-4` still reads as the number it means)."""

    model_config = ConfigDict(extra="forbid")


class Model(Section):
    name_or_path: Path_
    revision: str | None
    allow_download: bool
    training_chat_template: Path_ | None


class Replay(Section):
    path: Path_ | None  # general chat records; null: no replay
    fraction: Annotated[Number, Field(ge=0, lt=1)]  # share of the train split after mixing


class Review(Section):
    path: Path_ | None  # a folder of filled review sheets; null: none read
    corrections: Literal["relabel", "train", "off"]


class Data(Section):
    path: Path_ | list[Path_]
    kind: RecordKind | Literal["auto"]  # auto: detected per file from its fields
    test_path: Path_ | None
    validation_path: Path_ | None
    max_rejected_fraction: Fraction
    fatal_reasons: list[str]
    length_policy: LengthPolicy
    schema_drift: Literal["warn", "fail"]
    columns: dict[str, str]  # your field name -> the kind's field name
    replay: Replay
    review: Review
    engine: Literal["local", "ray"]  # where validate, dedup and split run their per-row work


class TaskSafety(Section):
    refusal_regex: str | None  # what a refusal looks like, for the `refusal` check
    checks: dict[str, list[SafetyCheck]]  # red-team category -> checks; `default` for the rest

    @model_validator(mode="after")
    def _consistent(self):
        if "default" not in self.checks:
            raise ValueError("checks needs a `default` entry (the categories not listed)")
        if self.refusal_regex is not None:
            try:
                re.compile(self.refusal_regex)
            except re.error as err:
                raise ValueError(f"refusal_regex does not compile: {err}") from None
        elif any("refusal" in c for c in self.checks.values()):
            raise ValueError("a `refusal` check needs refusal_regex")
        return self


class Task(Section):
    name: str
    answer_regex: str | None
    labels: dict[str, list[str]]
    stratify_by: list[str]
    answer_schema: dict[str, Any] | None = None  # optional: only some tasks declare one
    metrics: list[str] = Field(min_length=1)
    safety: TaskSafety

    @model_validator(mode="after")
    def _consistent(self):
        groups = set()
        if self.answer_regex is not None:
            try:
                groups = set(re.compile(self.answer_regex).groupindex)
            except re.error as err:
                raise ValueError(f"answer_regex does not compile: {err}") from None
        if unknown := set(self.labels) - groups:
            raise ValueError(f"labels {sorted(unknown)} name no group of answer_regex")
        if unknown := set(self.stratify_by) - groups:
            raise ValueError(f"stratify_by {sorted(unknown)} name no group of answer_regex")
        if missing := [m for m in self.metrics if not (METRIC_MODULES / f"{m}.py").exists()]:
            known = sorted(p.stem for p in METRIC_MODULES.glob("*.py"))
            raise ValueError(f"metrics {missing}: no module in stages/metrics/ (there: {known})")
        return self


class Dedup(Section):
    shingle_size: Positive
    num_perm: Annotated[int, Field(ge=16)]
    threshold: Annotated[Number, Field(gt=0, le=1)]
    conflict_policy: ConflictPolicy


class Leakage(Section):
    policy: LeakagePolicy
    min_overlap: Annotated[Number, Field(gt=0, le=1)]
    short_record_words: Positive
    external_eval: Path_ | None


class Split(Section):
    train: Fraction
    validation: Fraction
    test: Fraction
    group_threshold: Annotated[Number, Field(gt=0, le=1)] | None  # null: no grouping
    leakage: Leakage
    rebalance: Literal["none", "cap", "upsample"]
    rebalance_cap: Positive | None

    @model_validator(mode="after")
    def _sums_to_one(self):
        if abs(self.train + self.validation + self.test - 1) > 1e-6:
            raise ValueError(
                f"train + validation + test = {self.train + self.validation + self.test:g}, not 1"
            )
        return self


class Train(Section):
    # keys named as TRL's SFTConfig / DPOConfig names them pass to it as they are (train.py)
    learning_rate: Annotated[Number, Field(gt=0)]
    max_steps: int  # -1: whole epochs (num_train_epochs)
    num_train_epochs: Annotated[Number, Field(gt=0)]
    per_device_train_batch_size: Positive
    gradient_accumulation_steps: Positive
    lr_scheduler_type: Scheduler
    warmup_steps: Annotated[Number, Field(ge=0)]  # below 1: a fraction of the steps
    weight_decay: Annotated[Number, Field(ge=0)]
    max_length: Positive | Literal["auto"] | None
    train_sampling_strategy: Literal["random", "group_by_length"]
    padding_free: bool | Literal["auto"]
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"]
    use_liger_kernel: bool | Literal["auto"]
    packing: bool
    activation_checkpointing: bool
    eval_steps: Positive
    per_device_eval_batch_size: Positive
    early_stopping_patience: Positive | None
    logging_steps: Positive
    precision: Precision

    @model_validator(mode="after")
    def _steps(self):
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps={self.max_steps}: use a positive number of steps, "
                f"or -1 for whole epochs (num_train_epochs)"
            )
        return self


class Lora(Section):
    name: Literal["lora", "dora"]
    r: Positive
    alpha: Annotated[Number, Field(gt=0)]
    dropout: Annotated[Number, Field(ge=0, lt=1)]
    target_modules: str | list[str]


class QLora(Lora):
    name: Literal["qlora"]
    quant_type: Literal["nf4", "fp4"]
    double_quant: bool


class Full(Section):
    name: Literal["full"]


class PromptLearning(Section):  # prefix tuning, prompt tuning: learned virtual tokens
    name: Literal["prefix", "prompt"]
    num_virtual_tokens: Positive


class Ia3(Section):
    name: Literal["ia3"]
    target_modules: str | list[str] | None  # null: PEFT's choice for the model family
    feedforward_modules: str | list[str] | None  # of target_modules, those scaled on the input


class Sft(Section):
    name: Literal["sft"]
    train_on: TrainOn


class Dpo(Section):
    name: Literal["dpo"]
    beta: Annotated[Number, Field(gt=0)]
    loss_type: DpoLoss


class Cpt(Section):
    name: Literal["cpt"]


class Reward(Section):
    name: Literal["reward"]


class Grpo(Section):
    name: Literal["grpo"]
    train_on: TrainOn  # the SFT phase the RL phase starts from
    steps: Positive  # GRPO optimizer steps after the SFT phase
    learning_rate: Annotated[Number, Field(gt=0)]
    prompts_per_step: Positive
    num_generations: Annotated[int, Field(ge=2)]  # a group of one has no advantage
    max_completion_length: Positive
    temperature: Annotated[Number, Field(gt=0)]
    beta: Annotated[Number, Field(ge=0)]  # KL pull to the SFT model; 0 holds no reference copy
    rewards: Annotated[dict[str, Annotated[Number, Field(ge=0)]], Field(min_length=1)]
    reward_model: Path_ | None  # a reward model folder or hub id, for rewards.reward_model


class Augment(Section):
    min_rows: Annotated[int, Field(ge=0)]  # 0 = off
    per_row: Positive
    max_rows: Annotated[int, Field(ge=0)]
    generator: Endpoint | None  # null = the base model
    temperature: Annotated[Number, Field(gt=0)]
    max_new_tokens: Positive
    batch_size: Positive
    label_check: bool
    prompt: Annotated[str, Field(pattern=r"\{request\}")]


class Launch(Section):
    name: Literal["single", "ddp", "fsdp", "deepspeed"]
    num_processes: Positive  # per node
    config_file: Path_
    nodes: Positive
    rdzv_endpoint: Annotated[str, Field(pattern=r"^[^\s:]+:\d+$")] | None  # host:port of node 0


class Export(Section):
    check_examples: Annotated[int, Field(ge=0)]
    max_new_tokens: Positive


class Endpoint(Section):  # an OpenAI-compatible chat endpoint (stages/common/generation.py)
    base_url: Annotated[str, Field(pattern=r"^https?://")]
    model: Annotated[str, Field(min_length=1)]
    api_key_env: EnvName
    timeout: Annotated[Number, Field(gt=0)]


class Safety(Section):
    paths: list[Path_]
    max_new_tokens: Positive
    judge: Endpoint | None  # grades red-team answers


class Eval(Section):
    max_new_tokens: Positive | Literal["auto"]
    batch_size: Positive
    max_examples: Positive | None
    review_sample: Annotated[int, Field(ge=0)]
    general_path: Path_ | None
    general_max_new_tokens: Positive
    max_forgetting: Number | None  # the most the general-set loss may rise (negative: must fall)
    safety: Safety
    min_safety: Fraction | None  # the least share of red-team prompts the tuned model must pass


class Serve(Section):
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)]
    api_key_env: EnvName
    allowed_hosts: list[str]
    add_system_prompt: bool
    log_requests: bool  # log every chat answer for feedback (opt-in)
    log_dir: Path_
    retention_days: Positive


class Regression(Section):
    confidence: Annotated[Number, Field(gt=0, lt=1)]
    resamples: Annotated[int, Field(ge=100)]
    tolerance: dict[str, Annotated[Number, Field(ge=0)]]
    relative: list[str]
    lower_is_better: list[str]

    @model_validator(mode="after")
    def _default_tolerance(self):
        if "default" not in self.tolerance:
            raise ValueError("tolerance needs a `default` entry")
        return self


class Tracking(Section):
    project: Annotated[str, Field(min_length=1)]
    entity: str | None
    mode: Literal["offline", "online", "disabled"]
    tags: list[str]
    system_metrics: bool


class Params(Section):
    model: Model
    data: Data
    task: Task
    dedup: Dedup
    split: Split
    augment: Augment
    train: Train
    method: Annotated[Lora | QLora | Full | PromptLearning | Ia3, Field(discriminator="name")]
    objective: Annotated[Sft | Dpo | Cpt | Reward | Grpo, Field(discriminator="name")]
    launch: Launch
    export: Export
    eval: Eval
    serve: Serve
    regression: Regression
    tracking: Tracking
    seed: Annotated[int, Field(ge=0)]
    preset: str | None


def _where(loc: tuple, params: dict) -> str:
    """The key path of an error: `method.r`, not pydantic's `method.lora.r`; union members'
    labels (`train.max_length.constrained-int`) are not keys either."""
    keys, node = [], params
    for part in loc:
        if isinstance(node, dict) and part in node:
            keys.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int):
            keys.append(str(part))
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict) and part == node.get("name"):
            continue  # the tag of a tagged union (method, objective)
        elif isinstance(node, dict):
            keys.append(str(part))  # an unknown or missing key
            node = None
        else:
            break  # labels of a union's members, below the value itself
    return ".".join(keys)


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return []
        model = field.annotation
        options = [a for a in get_args(model) if isinstance(a, type) and issubclass(a, Section)]
        model = options[0] if options else model
    return (
        list(model.model_fields) if isinstance(model, type) and issubclass(model, Section) else []
    )


def describe(err: ValidationError, params: dict) -> str:
    """One line for the first few problems: key, value, what is allowed."""
    problems: dict[str, list[str]] = {}  # key path -> messages (a union gives one per member)
    for e in err.errors():
        where = _where(e["loc"], params)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _allowed_keys(e["loc"]), n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (not in the schema)"
            problems.setdefault(f"{where}: unknown key{hint}", [])
        elif e["type"] == "missing":
            problems.setdefault(
                f"{where}: missing (compose params.yaml from conf/: `make params`)", []
            )
        elif e["type"] == "union_tag_invalid":
            tag = e["ctx"]["tag"]
            problems.setdefault(f"{where}.name={tag!r}: use one of {e['ctx']['expected_tags']}", [])
        else:
            shown = "" if isinstance(e["input"], dict) else f"={e['input']!r}"
            problems.setdefault(f"{where or 'params'}{shown}", []).append(
                e["msg"].removeprefix("Value error, ")
            )
    lines = []
    for head, msgs in problems.items():
        msgs = list(dict.fromkeys(msgs))
        if len(msgs) > 1 and all(m.startswith("Input should be ") for m in msgs):
            msgs = [msgs[0]] + [m.removeprefix("Input should be ") for m in msgs[1:]]
        lines.append(f"{head}: {', or '.join(msgs)}" if msgs else head)
    more = len(lines) - 3
    return "; ".join(lines[:3]) + (f"; and {more} more" if more > 0 else "")


def check(params: Any) -> dict:
    """The params, checked against the schema, with numbers as numbers; raises ValueError
    with `describe`'s one line."""
    if not isinstance(params, dict):
        raise ValueError(f"expected a mapping of sections, found {type(params).__name__}")  # noqa: TRY004
    try:
        typed = Params.model_validate(params)
    except ValidationError as err:
        raise ValueError(describe(err, params)) from None
    return typed.model_dump(exclude_unset=True)
