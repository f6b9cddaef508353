"""Stage train: fine-tune the base model on the train split, validating on the validation split.

Reads like a recipe:
1. params: `method` (lora | qlora | dora | full | ia3 | prefix | prompt), `objective`
   (sft | dpo | cpt | reward | grpo), `train`, `launch`;
   with launch.num_processes > 1 the stage relaunches itself, one process per GPU (accelerate) or
   per CPU slot (torchrun, gloo);
2. the base model, 4-bit for QLoRA, and the examples: chat records tokenized here with loss on
   the answers only (stages/common/examples.py), raw text packed for continued pre-training,
   preference pairs handed to TRL's DPOTrainer, or to its RewardTrainer for a reward model
   (the base with a one-score head, objective=reward);
3. a pre-flight plan before the first step (parameters, tokens, optimizer steps, time and memory
   measured on a few warm-up batches), into the report and W&B;
4. training with validation loss every `train.eval_steps`, a checkpoint at each evaluation in
   models/checkpoints (a killed run started again resumes from the last one), optional early
   stopping, and the best checkpoint by validation loss as the result;
   objective=grpo then runs TRL's GRPOTrainer from that SFT model on the train prompts, with
   rewards from the task's own metrics (stages/metrics) and/or a reward model;
5. outputs: models/tuned (the adapter, or the whole model for method=full), reports/train.json,
   loss curves in reports/plots/.

Precision: fp32 on CPU (bf16 matmuls are ~500x slower there), bf16 on a GPU that supports it,
fp16 mixed precision on older GPUs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stages.common import compat, memory, paths, tracking, tuned
from stages.common.config import StageError, load_params, require_dependency, run_stage
from stages.common.examples import (
    ExampleError,
    record_examples,
    trainable_tokens,
    trained_turns,
    truncate,
)
from stages.common.files import atomic_dir, md5_path, read_jsonl, write_json, write_text
from stages.common.kinds import answer_of, prompt_of
from stages.common.task import Task

BASE, TEMPLATE = paths.BASE, paths.TRAINING_TEMPLATE
TRAIN, VALIDATION = paths.TRAIN, paths.VALIDATION
SYNTHETIC = paths.SYNTHETIC  # augment's verified paraphrases, trained beside TRAIN
OUT_DIR, CHECKPOINTS, RUN_FILE = paths.TUNED, paths.CHECKPOINTS, paths.RUN_FILE
REPORT = paths.stage_report("train")
MAX_LENGTH = paths.MAX_LENGTH  # train.max_length=auto: what validate chose
# objective -> the field its records have (grpo: the SFT phase's chat records, whose prompts
# the RL phase answers and whose answers its rewards score against)
OBJECTIVES = {
    "sft": "messages",
    "dpo": "chosen",
    "reward": "chosen",
    "cpt": "text",
    "grpo": "messages",
}
WARMUP_BATCHES = 4  # the first is not counted: it pays for allocation and kernel choice


# --- 1. launch -----------------------------------------------------------------------------


def relaunch_distributed(launch: dict) -> int | None:
    """With launch.num_processes > 1 or launch.nodes > 1, run this stage under a distributed
    launcher; None when this process is already one of the workers (or one process is asked
    for). On several nodes each runs this stage with its NODE_RANK (0: the one `dvc repro`
    runs on, which writes the outputs) and they meet at launch.rdzv_endpoint."""
    n, nodes = int(launch["num_processes"]), int(launch["nodes"])
    if (n <= 1 and nodes <= 1) or "LOCAL_RANK" in os.environ:
        return None
    require_dependency("train", "launch.config_file", launch["config_file"])
    node_rank, host, port = node_placement(nodes, launch["rdzv_endpoint"], launch["name"])
    import torch

    bin_dir = Path(sys.executable).parent
    if torch.cuda.is_available():
        cmd = [
            str(bin_dir / "accelerate"),
            "launch",
            "--config_file",
            launch["config_file"],
            "--num_processes",
            str(n * nodes),  # accelerate counts the processes of every node
        ]
        if nodes > 1:
            cmd += ["--num_machines", str(nodes), "--machine_rank", str(node_rank)]
            cmd += ["--main_process_ip", host, "--main_process_port", port]
    else:  # accelerate's multi-CPU launcher needs MPI; torchrun with gloo does not
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}"]
        if nodes > 1:  # static rendezvous: node ranks are given, node 0 hosts the store
            cmd += [f"--nnodes={nodes}", f"--node_rank={node_rank}"]
            cmd += [f"--master_addr={host}", f"--master_port={port}"]
        else:
            cmd.append("--standalone")
    cmd += ["-m", "stages.train"]
    where = f" on node {node_rank} of {nodes}" if nodes > 1 else ""
    print(f"train: launching {n} processes{where}: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def node_placement(nodes: int, endpoint: str | None, launch_name: str) -> tuple[int, str, str]:
    """(this node's rank from NODE_RANK, rendezvous host, port) for a run on `nodes` nodes."""
    if nodes == 1:
        return 0, "", ""
    if launch_name == "single":
        raise StageError(
            f"launch.nodes={nodes} with launch=single: choose a distributed launch "
            f"(-S launch=ddp, fsdp or deepspeed; launch.num_processes per node)"
        )
    if not endpoint:
        raise StageError(
            f"launch.nodes={nodes}: set launch.rdzv_endpoint to host:port of node 0, "
            f"which every node can reach"
        )
    rank = os.environ.get("NODE_RANK", "0")
    if not rank.isdigit() or int(rank) >= nodes:
        raise StageError(
            f"NODE_RANK={rank!r}: give each of the {nodes} nodes one of 0..{nodes - 1}"
        )
    host, port = endpoint.rsplit(":", 1)
    return int(rank), host, port


def relaunched(launch: dict) -> bool:
    """True when this process launched the workers and they finished (a failure stops)."""
    exit_code = relaunch_distributed(launch)
    if exit_code is None:
        return False
    if exit_code != 0:
        raise StageError(f"distributed training failed (exit code {exit_code}); see above")
    return True


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def choose_precision(setting: str) -> str:
    """auto: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU (bf16 matmuls are
    ~500x slower than fp32 on CPUs without bf16 instructions)."""
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def choose_attention(setting: str) -> str:
    """auto: flash-attention 2 when it is installed and a GPU runs it, else PyTorch's SDPA."""
    import torch

    if setting != "auto":
        if setting == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise StageError(
                "train.attn_implementation=flash_attention_2: the flash-attn "
                "package is not installed (pip install flash-attn)"
            )
        return setting
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash else "sdpa"


def choose_liger(setting) -> bool:
    """Liger's fused kernels (TRL's use_liger_kernel): auto = on with a GPU and the package."""
    import torch

    installed = importlib.util.find_spec("liger_kernel") is not None
    if setting == "auto":
        return torch.cuda.is_available() and installed
    if setting and not installed:
        raise StageError(
            "train.use_liger_kernel=true: the liger-kernel package is not "
            "installed (pip install liger-kernel)"
        )
    return bool(setting)


# --- 2. model and examples ------------------------------------------------------------------


def load_model(method: dict, precision: str, attention: str, reward: bool = False):
    """The base in the training precision; full fine-tuning in fp16 keeps fp32 master weights
    (mixed precision), LoRA adapters are fp32 whatever the base. `reward`: with a one-score
    head instead of the language model head (objective=reward)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if method["name"] == "full" and precision == "fp16":
        dtype = torch.float32
    load = tuned.load_reward_base if reward else AutoModelForCausalLM.from_pretrained
    if method["name"] != "qlora":
        return load(BASE, dtype=dtype, attn_implementation=attention)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method["quant_type"],
        bnb_4bit_use_double_quant=bool(method["double_quant"]),
        bnb_4bit_compute_dtype=dtype,
    )
    device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else None
    # no peft.prepare_model_for_kbit_training: it upcasts every unquantized weight to fp32,
    # and an fp32 embedding and norms turn the whole residual stream fp32 (measured on an
    # H200: +0.43 GiB of weights at 1.5B, ~2 GiB at 8B, fp32 activations); peft freezes the
    # base and TRL enables input gradients for activation checkpointing by themselves
    return load(
        BASE,
        dtype=dtype,
        device_map=device_map,
        quantization_config=quantization,
        attn_implementation=attention,
    )


def peft_config(method: dict, task_type: str = "CAUSAL_LM"):
    """The adapter PEFT trains for `method`; None for full fine-tuning. `task_type` SEQ_CLS
    (a reward model) also trains the new score head whole."""
    import peft

    name = method["name"]
    if name == "full":
        return None
    if name in ("prefix", "prompt") and task_type != "CAUSAL_LM":
        raise StageError(
            f"method={name} learns virtual tokens for generation; a reward model (objective="
            "reward) trains with method=lora, dora, qlora, ia3 or full"
        )
    if name == "prefix":
        return peft.PrefixTuningConfig(
            num_virtual_tokens=method["num_virtual_tokens"], task_type=task_type
        )
    if name == "prompt":
        return peft.PromptTuningConfig(
            num_virtual_tokens=method["num_virtual_tokens"], task_type=task_type
        )
    if name == "ia3":
        return peft.IA3Config(
            target_modules=method["target_modules"],
            feedforward_modules=method["feedforward_modules"],
            task_type=task_type,
        )
    return peft.LoraConfig(
        r=int(method["r"]),
        lora_alpha=int(method["alpha"]),
        lora_dropout=float(method["dropout"]),
        target_modules=method["target_modules"],
        use_dora=method["name"] == "dora",
        task_type=task_type,
    )


def read_records(path: Path, objective: str) -> list[dict]:
    """The split's records, checked to be the shape the objective trains on."""
    field = OBJECTIVES[objective]
    records = read_jsonl(path)
    other = next((r for r in records if field not in r), None)
    if other is not None:
        wanted = {"messages": "chat (messages)", "chosen": "preference", "text": "text"}[field]
        raise StageError(
            f"{path}: objective={objective} trains on {wanted} records, found a "
            f"'{other.get('kind')}' record (line {other.get('line')} of {other.get('source')}); "
            f"choose the objective that fits the data, or data of that kind"
        )
    return records


def training_records(objective: str) -> list[dict]:
    """The train split, then augment's verified paraphrases of its rare strata (none when
    augment is off; absent when the stages run by hand without it)."""
    records = read_records(TRAIN, objective)
    return records + (read_records(SYNTHETIC, objective) if SYNTHETIC.exists() else [])


def chosen_max_length(setting) -> int | None:
    """train.max_length in tokens: as set, null for no cap, or what validate chose for `auto`
    (from the records' measured lengths; reports/validate.json says how)."""
    if setting != "auto":
        return int(setting) if setting else None
    if not MAX_LENGTH.exists():
        raise StageError(
            f"train.max_length=auto takes the length validate chose, and "
            f"{MAX_LENGTH} is missing: run the validate stage first"
        )
    return json.loads(MAX_LENGTH.read_text(encoding="utf-8"))["max_length"]


def tokenized_rows(
    records: list[dict], tokenizer, train_on: str, max_length: int | None, packing: bool
) -> list[dict]:
    """input_ids + labels per record (stages/common/examples.py), cut at max_length unless
    packing splits them; a row left without a trained token is an error naming its line."""
    template = TEMPLATE.read_text(encoding="utf-8")
    examples = record_examples(tokenizer, records, template, train_on, collect_errors=True)
    rows = []
    for r, example in zip(records, examples):
        where = f"{r.get('source')}:{r.get('line')}"
        if isinstance(example, ExampleError):
            raise StageError(f"{where}: {example}")
        row = example if packing else truncate(example, max_length)
        if not trainable_tokens(row):
            raise StageError(
                f"{where}: no trainable tokens left within train.max_length={max_length}"
            )
        rows.append(row)
    return rows


def preference_rows(records: list[dict]) -> list[dict]:
    def plain(messages):
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    return [
        {
            "prompt": plain(r["prompt"]),
            "chosen": plain(r["chosen"]),
            "rejected": plain(r["rejected"]),
        }
        for r in records
    ]


def build_trainer(params: dict, precision: str, output_dir: str):
    """The TRL trainer for the objective, on the train and validation splits, as the stage runs
    it."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, EarlyStoppingCallback, set_seed

    cfg, method, seed = params["train"], params["method"], int(params["seed"])
    objective = params["objective"]["name"]
    set_seed(seed)
    if not torch.cuda.is_available():
        compat.score_only_answer_tokens()
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    train_records = training_records(objective)
    eval_records = read_records(VALIDATION, objective)
    if not train_records:
        raise StageError(f"{TRAIN}: no training records")
    patience = cfg["early_stopping_patience"]
    # the run's own settings; every train.* key the trainer takes comes after, as it is
    common = {
        "output_dir": output_dir,
        "eval_strategy": "steps" if eval_records else "no",
        # a checkpoint at every evaluation: resume point, and candidate for the best model
        "save_strategy": "steps",
        "save_steps": cfg["eval_steps"],
        "save_total_limit": 2,  # the latest and the best
        "load_best_model_at_end": bool(eval_records),
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not torch.cuda.is_available(),
        # live train/* and eval/* curves into the stage's W&B run (opened by tracking)
        "report_to": ["wandb"]
        if is_main_process() and os.environ.get("WANDB_MODE") != "disabled"
        else [],
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",  # for tokens/s in the report
        "ddp_find_unused_parameters": False,
    }
    callbacks = [stop_on_non_finite_loss()] + (
        [EarlyStoppingCallback(early_stopping_patience=int(patience))]
        if patience and eval_records
        else []
    )
    reward = objective == "reward"
    peft = peft_config(method, "SEQ_CLS" if reward else "CAUSAL_LM")
    attention = choose_attention(cfg["attn_implementation"])
    common["use_liger_kernel"] = choose_liger(cfg["use_liger_kernel"])  # `auto` resolved here
    model = load_model(method, precision, attention, reward=reward)
    max_length = chosen_max_length(cfg["max_length"])

    if reward:
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(
            **trainer_settings(cfg, RewardConfig),
            **{**common, "use_liger_kernel": False},  # Liger has no sequence-classification loss
            max_length=max_length,
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            peft_config=peft,
            train_dataset=Dataset.from_list(preference_rows(train_records)),
            eval_dataset=Dataset.from_list(preference_rows(eval_records)) if eval_records else None,
            callbacks=callbacks,
        )
        # RewardTrainer drops pairs longer than max_length: never silently
        dropped = len(train_records) - len(trainer.train_dataset)
        if dropped:
            print(
                f"train: warning: {dropped} of {len(train_records)} training pairs are longer "
                f"than train.max_length={max_length} and were left out by RewardTrainer",
                flush=True,
            )
        return trainer

    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            **trainer_settings(cfg, DPOConfig),
            **common,
            max_length=max_length,
            beta=float(params["objective"]["beta"]),
            loss_type=[params["objective"]["loss_type"]],
        )
        return DPOTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            peft_config=peft,
            train_dataset=Dataset.from_list(preference_rows(train_records)),
            eval_dataset=Dataset.from_list(preference_rows(eval_records)) if eval_records else None,
            callbacks=callbacks,
        )

    from trl import SFTConfig, SFTTrainer

    packing = bool(cfg["packing"])
    if packing and not max_length:
        raise StageError(
            "train.packing=true packs rows into max_length windows: set train.max_length"
        )
    train_on = trained_turns(params["objective"])
    rows = {
        name: tokenized_rows(records, tokenizer, train_on, max_length, packing)
        for name, records in (("train", train_records), ("eval", eval_records))
    }
    padding_free = cfg["padding_free"]
    if padding_free == "auto":  # only flash-attention's varlen kernels make it pay
        padding_free = attention == "flash_attention_2"
    args = SFTConfig(
        # without padding the pad id is a real token (SmolLM2 pads with <|im_end|>): count all
        **trainer_settings(cfg, SFTConfig),
        **{
            **common,
            "include_num_input_tokens_seen": "all" if packing or padding_free else "non_padding",
        },
        packing_strategy="bfd_split",  # rows longer than max_length are split, never dropped
        padding_free=bool(padding_free),
        # rows arrive tokenized and cut to max_length (validate measured them); padding-free
        # batching without packing needs max_length unset
        max_length=max_length if packing else None,
    )
    return SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        peft_config=peft,
        train_dataset=Dataset.from_list(rows["train"]),
        eval_dataset=Dataset.from_list(rows["eval"]) if rows["eval"] else None,
        callbacks=callbacks,
    )


# train.* keys that are the trainer's arguments but are resolved by the stage (`auto`, the
# token budget validate chose), or that only SFT has (DPO pairs are not grouped by length)
RESOLVED_HERE = {"max_length", "padding_free", "use_liger_kernel"}
SFT_ONLY = {"packing", "train_sampling_strategy"}


def trainer_settings(cfg: dict, config_class) -> dict:
    """The train.* settings that `config_class` (SFTConfig, DPOConfig, RewardConfig) takes
    under the same name, passed as they are: the config's names are the trainer's."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)} - RESOLVED_HERE
    if config_class.__name__ != "SFTConfig":
        names -= SFT_ONLY
    return {key: value for key, value in cfg.items() if key in names}


def stop_on_non_finite_loss():
    """A callback that stops a diverging run at the first NaN or infinite loss it logs (a run
    that goes on would write null metrics and a broken model as if nothing happened)."""
    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "eval_loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise StageError(
                        f"training diverged: {key}={value} at step {state.global_step} "
                        f"(train.learning_rate={args.learning_rate:g}); lower the learning "
                        f"rate, raise train.warmup_steps or check the data for extreme rows"
                    )

    return StopOnNonFiniteLoss()


# --- 2b. objective=grpo: the RL phase after SFT -------------------------------------------------


def reward_functions(objective: dict, task: Task) -> tuple[list, list[float]]:
    """GRPO's rewards and their weights, from objective.rewards: the task's per-example
    metrics by name, and `reward_model` for the model objective.reward_model names."""
    available = sorted(task.score(["x"], ["x"])[1])
    funcs, weights = [], []
    for name, weight in objective["rewards"].items():
        if name == "reward_model":
            funcs.append(reward_model(objective["reward_model"]))
        elif name in available:
            funcs.append(task_reward(task, name))
        else:
            raise StageError(
                f"objective.rewards: no reward {name!r}; task {task.name} scores each answer "
                f"by {available}, and reward_model is the model objective.reward_model names"
            )
        weights.append(float(weight))
    return funcs, weights


def task_reward(task: Task, metric: str):
    """A GRPO reward: the task's per-example score `metric` of each sampled answer against its
    prompt's reference answer, by the code that scores the test split (Task.score)."""

    def reward(completions, reference, **_) -> list[float]:
        answers = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        # a reasoning model writes <think>...</think> first; the answer follows (as evaluate)
        answers = [a.rsplit("</think>", 1)[-1].strip() for a in answers]
        return task.score(answers, list(reference))[1][metric]

    reward.__name__ = metric  # TRL logs rewards/<name>/mean
    return reward


def reward_model(name_or_path: str | None):
    """The reward model objective.reward_model names (a local folder must be declared in the
    train stage's deps), on the device training runs on."""
    if not name_or_path:
        raise StageError(
            "objective.rewards.reward_model needs objective.reward_model: a reward model folder "
            "(models/merged of an objective=reward experiment) or a hub id"
        )
    if Path(name_or_path).exists():
        require_dependency("train", "objective.reward_model", name_or_path)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tuned.load(Path(name_or_path), torch.float32, device)
    if not tuned.is_reward_model(Path(name_or_path)):
        raise StageError(f"objective.reward_model: {name_or_path} is no reward model")
    return model


def reinforce(params: dict, sft_trainer, precision: str):
    """The RL phase of objective=grpo: TRL's GRPOTrainer, from the SFT phase's model (its
    adapter trains on), on the train split's prompts; the model and what the phase did."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    objective, seed = params["objective"], int(params["seed"])
    task = Task.from_params(params)
    funcs, weights = reward_functions(objective, task)
    # the task's prompts: replay rows (general chat, data.replay) have no task answer to reward
    records = [r for r in training_records("grpo") if prompt_of(r) and not r.get("replay")]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt_of(r)],
                "reference": answer_of(r),
            }
            for r in records
        ]
    )
    args = GRPOConfig(
        output_dir=str(CHECKPOINTS / "grpo"),
        save_strategy="no",  # a killed RL phase starts again from the SFT phase
        max_steps=int(objective["steps"]),
        learning_rate=float(objective["learning_rate"]),
        per_device_train_batch_size=int(
            objective["prompts_per_step"] * objective["num_generations"]
        ),
        num_generations=int(objective["num_generations"]),
        max_completion_length=int(objective["max_completion_length"]),
        temperature=float(objective["temperature"]),
        beta=float(objective["beta"]),
        reward_weights=weights,
        logging_steps=1,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        report_to=sft_trainer.args.report_to,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    rl = GRPOTrainer(
        model=sft_trainer.model,
        reward_funcs=funcs,
        args=args,
        processing_class=AutoTokenizer.from_pretrained(BASE),  # its own: it pads on the left
        train_dataset=dataset,
    )
    start = time.perf_counter()
    rl.train()
    logged = [h for h in rl.state.log_history if "reward" in h]
    names = [
        f.__name__ if callable(f) and hasattr(f, "__name__") else "reward_model" for f in funcs
    ]

    def mean_of(h, name):
        return round(h.get(f"rewards/{name}/mean", float("nan")), 4)

    return rl.model, {
        "steps": rl.state.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "prompts": len(dataset),
        "rewards": dict(zip(names, weights)),
        # the weighted reward of the sampled answers, at the first and the last step
        "reward_first": round(logged[0]["reward"], 4) if logged else None,
        "reward_last": round(logged[-1]["reward"], 4) if logged else None,
        "per_reward_first": {n: mean_of(logged[0], n) for n in names} if logged else {},
        "per_reward_last": {n: mean_of(logged[-1], n) for n in names} if logged else {},
    }


# --- 3. pre-flight plan ------------------------------------------------------------------------


TOO_BIG = (
    "lower train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
    "batch), set train.activation_checkpointing: true or a smaller train.max_length, or use "
    "method=qlora"
)


def preflight(trainer, n_processes: int) -> dict:
    """What the run will cost, measured before the first step: time on a few warm-up batches,
    memory on the longest batch of the data; a run that cannot fit the device stops here.

    Forward and backward only (no optimizer step, gradients cleared, RNG restored), so the
    run that follows is exactly the run without the measurement."""
    import resource

    import torch

    model, args = trainer.model, trainer.args
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    dataset = trainer.train_dataset
    length_columns = [
        c
        for c in ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids")
        if c in dataset.column_names
    ]
    loader = trainer.get_train_dataloader()
    batches_per_epoch = len(loader)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    steps = (
        args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    )

    rng = torch.random.get_rng_state()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    if args.activation_checkpointing:  # Trainer turns it on in train(): measure with it on
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=args.activation_checkpointing_kwargs or None
        )

    def forward_backward(batch) -> float:
        start = time.perf_counter()
        loss = trainer.compute_loss(model, compat.prepare_inputs(trainer, batch))
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # the memory peak comes from the longest batch the data holds, not from a typical one
    lengths = [sum(row) for row in zip(*([len(ids) for ids in dataset[c]] for c in length_columns))]
    longest = sorted(range(len(lengths)), key=lengths.__getitem__)
    try:
        seconds = [forward_backward(b) for b in itertools.islice(loader, WARMUP_BATCHES)]
        if longest:
            forward_backward(
                loader.collate_fn(
                    [loader.dataset[i] for i in longest[-args.per_device_train_batch_size :]]
                )
            )
    except torch.OutOfMemoryError as err:  # the device is far too small: say so in one line
        raise StageError(
            f"train: a batch of the data does not fit on cuda ({err}".split("\n")[0]
            + f"); {TOO_BIG}"
        ) from None
    model.zero_grad(set_to_none=True)
    torch.random.set_rng_state(rng)
    timed = sorted(seconds[1:]) or seconds
    per_batch = timed[len(timed) // 2]  # the median of the warm batches
    step_seconds = per_batch * args.gradient_accumulation_steps
    # AdamW keeps two fp32 moments per trainable weight, allocated at the first step
    optimizer_bytes = 2 * 4 * trainable
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    # a run that cannot fit stops now, not at the first optimizer step or in the OOM killer
    memory.require(
        "train",
        peak + optimizer_bytes,
        {"model and longest batch (measured)": peak, "optimizer state": optimizer_bytes},
        "cuda" if cuda else "cpu",
        TOO_BIG,
        already_used=memory.held_bytes("cuda" if cuda else "cpu"),
    )
    if cuda:  # the measurement's cached blocks go back: training allocates its own
        torch.cuda.empty_cache()
    return {
        "parameters": {
            "trainable": trainable,
            "total": total,
            "trainable_fraction": round(trainable / total, 5),
        },
        "train_examples": len(dataset),
        "tokens_per_epoch": sum(lengths),
        "processes": n_processes,
        "effective_batch": (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * n_processes
        ),
        "optimizer_steps": steps,
        "epochs": round(steps / steps_per_epoch, 2),
        "warmup_batches_measured": len(seconds),
        "estimated_seconds_per_step": round(step_seconds, 3),
        "estimated_train_minutes": round(step_seconds * steps / 60, 1),  # evaluations excluded
        "estimated_peak_memory_gib": round((peak + optimizer_bytes) / 2**30, 2),
        "memory_measured_on": "cuda" if cuda else "cpu (peak RSS)",
    }


# --- 4. checkpoints ------------------------------------------------------------------------------

# the packages whose versions change what a checkpoint holds or how it resumes
TRAINING_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
    "datasets",
    "tokenizers",
    "safetensors",
)


def run_fingerprint(params: dict, inputs: dict) -> str:
    """What makes two runs the same run, so a killed one may resume: the training params,
    the inputs, the code of this stage (its module and the shared modules) and the installed
    versions of the training packages. After a bug fix or an upgrade, a checkpoint of the old
    run is not resumed."""
    from importlib import metadata

    keys = ("train", "method", "objective", "seed", "launch", "task")
    here = Path(__file__).parent
    code = {
        str(p.relative_to(here)): md5_path(p)
        for p in [Path(__file__), *sorted((here / "common").glob("*.py"))]
    }
    versions = {}
    for package in TRAINING_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    blob = json.dumps(
        {
            "params": {k: params.get(k) for k in keys},
            "inputs": inputs,
            "code": code,
            "packages": versions,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def latest_checkpoint(fingerprint: str) -> Path | None:
    """The last complete checkpoint of an unfinished run with this fingerprint; else start
    clean (another run's checkpoints, or a finished run's, are removed)."""
    state = json.loads(RUN_FILE.read_text()) if RUN_FILE.exists() else {}
    if state.get("fingerprint") != fingerprint or state.get("finished"):
        shutil.rmtree(CHECKPOINTS, ignore_errors=True)
        return None
    complete = []
    for folder in CHECKPOINTS.glob("checkpoint-*"):
        try:  # trainer_state.json is written last: a kill mid-save leaves it out or cut
            json.loads((folder / "trainer_state.json").read_text())
            complete.append((int(folder.name.split("-")[1]), folder))
        except (OSError, ValueError):
            continue
    return max(complete)[1] if complete else None


def sort_adapter_config(path: Path) -> None:
    """peft saves target_modules from a set, in hash order: sort it so the output's md5
    (and DVC's view of it) is the same on every run."""
    if path.exists():
        config = json.loads(path.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        write_json(path, config)


def loss_curves(log_history: list[dict]) -> tuple[str, str]:
    train = ["step,loss"] + [f"{h['step']},{h['loss']}" for h in log_history if "loss" in h]
    evals = ["step,loss"] + [
        f"{h['step']},{h['eval_loss']}" for h in log_history if "eval_loss" in h
    ]
    return "\n".join(train) + "\n", "\n".join(evals) + "\n"


# --- 5. the stage --------------------------------------------------------------------------------


def main() -> None:
    """1. launch (one process per device when launch.num_processes > 1); 2. build the trainer
    (model and examples); 3. the pre-flight plan (`--plan` stops here); 4. train, resuming
    from the last checkpoint of the same run (objective=grpo: then the RL phase); 5. write
    models/tuned, the report and the loss curves, then clear the checkpoints."""
    params = load_params()
    # `python -m stages.train --plan` (make plan): measure and print the plan, train nothing
    plan_only = "--plan" in sys.argv[1:]
    if plan_only:
        os.environ["WANDB_MODE"] = "disabled"
        params["launch"] = {**params["launch"], "num_processes": 1}
    if relaunched(params["launch"]):
        return  # the workers did the work
    main_process = is_main_process()
    if not main_process:
        os.environ["WANDB_MODE"] = "disabled"
    n_processes = int(os.environ.get("WORLD_SIZE", "1"))
    inputs = {"train": md5_path(TRAIN), "validation": md5_path(VALIDATION), "base": md5_path(BASE)}
    if SYNTHETIC.exists() and SYNTHETIC.stat().st_size:
        inputs["synthetic"] = md5_path(SYNTHETIC)
    fingerprint = run_fingerprint(params, inputs)

    sections = ["train", "method", "objective", "launch", "model"]
    with tracking.stage_run("train", params, sections, inputs) as run:
        precision = choose_precision(params["train"]["precision"])
        resume_from = start_run(fingerprint, main_process and not plan_only, n_processes)
        trainer = build_trainer(params, precision, str(CHECKPOINTS))
        plan = preflight(trainer, n_processes)
        plan["setup"] = setup_summary(params, precision, trainer)
        if main_process:
            announce(run, plan, trainer, resume_from)
        if plan_only:
            print(json.dumps(plan, indent=2))
            return

        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        seconds = time.perf_counter() - start
        model, reinforced = trainer.model, None
        if params["objective"]["name"] == "grpo":  # the RL phase, from the SFT model
            model, reinforced = reinforce(params, trainer, precision)
        if not main_process:
            return
        save_outputs(trainer, model)
        report = build_report(params, precision, plan, trainer, result, seconds, resume_from)
        if reinforced:
            report["grpo"] = reinforced
        write_json(REPORT, report)
        run.summary.update(
            {
                "train/final_loss": report["final_train_loss"],
                "train/best_eval_loss": report["eval_loss"],
                "train/trainable_parameters": plan["parameters"]["trainable"],
                "train/resumed_from_step": report["resumed_from_step"],
            }
        )
        log_adapter_artifact(run, params["method"]["name"])
        # every output is written: only now is the run over, and its checkpoints of no use to
        # the next one (a kill before this line resumes from the last checkpoint)
        finish_run(fingerprint)
        print(
            f"train: {report['optimizer_steps']} steps in {seconds:.0f}s, "
            f"loss {report['final_train_loss']}, best eval loss {report['eval_loss']}"
            + (f" (step {report['best_step']})" if report["best_step"] else "")
            + (f", resumed from step {report['resumed_from_step']}" if resume_from else "")
        )


# --- the steps of main --------------------------------------------------------------------------


def setup_summary(params: dict, precision: str, trainer) -> dict:
    """What `auto` settings chose, for the plan."""
    return {
        "precision": precision,
        "max_length": chosen_max_length(params["train"]["max_length"]),
        "attention": choose_attention(params["train"]["attn_implementation"]),
        "liger_kernel": bool(trainer.args.use_liger_kernel),
        "padding_free": bool(getattr(trainer.args, "padding_free", False)),
    }


def announce(run, plan: dict, trainer, resume_from: Path | None) -> None:
    """The plan and the adapters' config into W&B, and the plan in one line."""
    peft = {
        name: json.loads(
            json.dumps(c.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v))
        )
        for name, c in getattr(trainer.model, "peft_config", {}).items()
    }
    run.config.update({"plan": plan, "peft_config": peft})
    print(
        f"train: plan: {plan['optimizer_steps']} steps of "
        f"{plan['effective_batch']} examples, {plan['parameters']['trainable']:,} "
        f"trainable parameters, ~{plan['estimated_train_minutes']} min, "
        f"~{plan['estimated_peak_memory_gib']} GiB"
        + (f"; resuming from {resume_from.name}" if resume_from else ""),
        flush=True,
    )
    if plan["epochs"] < 1:
        print(
            f"train: warning: {plan['optimizer_steps']} steps see {plan['epochs']} of "
            f"an epoch of {plan['train_examples']} examples; for full passes set "
            f"train.max_steps: -1 and train.num_train_epochs",
            flush=True,
        )


def save_outputs(trainer, model) -> None:
    """models/tuned (whole, or not at all) and the loss curves."""
    with atomic_dir(OUT_DIR) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        trainer.processing_class.save_pretrained(tmp)
        sort_adapter_config(Path(tmp) / "adapter_config.json")
    train_csv, eval_csv = loss_curves(trainer.state.log_history)
    write_text(paths.TRAIN_LOSS_CURVE, train_csv)
    write_text(paths.EVAL_LOSS_CURVE, eval_csv)


def build_report(params, precision, plan, trainer, result, seconds, resume_from) -> dict:
    import torch

    state = trainer.state
    evals = [h for h in state.log_history if "eval_loss" in h]
    best_step = (
        int(state.best_model_checkpoint.rsplit("-", 1)[1]) if state.best_model_checkpoint else None
    )
    report = {
        "method": params["method"]["name"],
        "objective": params["objective"]["name"],
        "precision": precision,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "plan": plan,
        "parameters": plan["parameters"],
        "optimizer_steps": state.global_step,
        "resumed": resume_from is not None,
        "resumed_from_step": (int(resume_from.name.split("-")[1]) if resume_from else None),
        "stopped_early": state.global_step < plan["optimizer_steps"],
        "best_step": best_step,
        "train_examples": plan["train_examples"],
        "validation_examples": len(trainer.eval_dataset) if trainer.eval_dataset else 0,
        "train_loss": round(result.training_loss, 4),
        "final_train_loss": next(
            (round(h["loss"], 4) for h in reversed(state.log_history) if "loss" in h), None
        ),
        "eval_loss": round(state.best_metric, 4) if state.best_metric is not None else None,
        "final_eval_loss": round(evals[-1]["eval_loss"], 4) if evals else None,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, state.global_step), 2),
    }
    if state.num_input_tokens_seen:
        report["tokens_per_second"] = round(state.num_input_tokens_seen / seconds, 1)
    return report


def start_run(fingerprint: str, owner: bool, n_processes: int) -> Path | None:
    """The checkpoint to resume from (the last of an unfinished run of the same fingerprint);
    the owner (main process, not --plan) marks the run started. Every worker of a distributed
    run resumes from the checkpoint the main process chose."""
    resume_from = latest_checkpoint(fingerprint) if owner else None
    if owner:
        CHECKPOINTS.mkdir(parents=True, exist_ok=True)
        write_json(RUN_FILE, {"fingerprint": fingerprint, "finished": False})
    return broadcast(resume_from) if n_processes > 1 else resume_from


def finish_run(fingerprint: str) -> None:
    """Clear the checkpoints and mark the run finished (a later run starts afresh)."""
    for item in CHECKPOINTS.iterdir():
        if item != RUN_FILE:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    write_json(RUN_FILE, {"fingerprint": fingerprint, "finished": True})


def broadcast(value):
    """The main process's value, on every process of a distributed run."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState()  # joins the process group torchrun / accelerate set up
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def log_adapter_artifact(run, method: str) -> None:
    """models/tuned as a W&B artifact reference: its checksums, not a second copy of the bytes."""
    import wandb

    if getattr(run, "disabled", False):
        return
    artifact = wandb.Artifact(
        f"tuned-{method}", type="model", metadata={"path": str(OUT_DIR), "md5": md5_path(OUT_DIR)}
    )
    artifact.add_reference(OUT_DIR.resolve().as_uri())
    run.log_artifact(artifact)


if __name__ == "__main__":
    run_stage(main)
