"""Stage train: supervised fine-tuning with TRL on the train split.

Loss is on assistant tokens only: TRL's `assistant_only_loss` reads the `{% generation %}`
markers of `models/base/chat_template_training.jinja`, which base_model proved renders exactly
the shipped template. LoRA (peft) or full fine-tuning by `method.name`; gradient accumulation,
scheduler with warmup and a validation loss every `train.eval_steps` come from `train`.
Precision: fp32 on CPU (bf16 matmuls are ~500x slower there), bf16 on a GPU that supports it.

Outputs: models/tuned/ (the LoRA adapter, or the full model for method=full),
reports/train.json, reports/plots/train_loss.csv and reports/plots/eval_loss.csv.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from stages.common import tracking
from stages.common.config import StageError, load_params, run_stage
from stages.common.files import atomic_dir, md5_path, read_jsonl, write_json, write_text

BASE = Path("models/base")
TEMPLATE = BASE / "chat_template_training.jinja"
TRAIN, VALIDATION = Path("data/processed/train.jsonl"), Path("data/processed/validation.jsonl")
OUT_DIR = Path("models/tuned")
REPORT = Path("reports/train.json")
PLOTS = Path("reports/plots")


def choose_precision(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def peft_config(method: dict):
    if method["name"] == "full":
        return None
    if method["name"] != "lora":
        raise StageError(f"method.name={method['name']}: use lora or full")
    from peft import LoraConfig

    return LoraConfig(r=int(method["r"]), lora_alpha=int(method["alpha"]),
                      lora_dropout=float(method["dropout"]), target_modules=method["target_modules"],
                      task_type="CAUSAL_LM")


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
    evals = ["step,loss"] + [f"{h['step']},{h['eval_loss']}" for h in log_history
                             if "eval_loss" in h]
    return "\n".join(train) + "\n", "\n".join(evals) + "\n"


def score_only_answer_tokens() -> None:
    """Make TRL's fused loss project only label positions through the LM head on CPU.

    TRL 1.16 skips the masked (prompt) positions only on Triton devices, to keep tile shapes
    stable for compilers; on CPU it scores every position and then throws most away. Our
    prompts are ~90% of each row, so this halves a CPU step (8.9 -> 4.0 s, same losses to
    the last digit). `trl.trainer.utils` imported the check by name, so we rebind it there.
    """
    import trl.trainer.utils as trl_utils

    if hasattr(trl_utils, "_use_triton"):
        trl_utils._use_triton = lambda device: True


def chat_records(path: Path) -> list[dict]:
    records = read_jsonl(path)
    other = next((r for r in records if "messages" not in r), None)
    if other is not None:
        raise StageError(f"{path}: supervised fine-tuning needs chat records, found a "
                         f"'{other.get('kind')}' record (line {other.get('line')} of "
                         f"{other.get('source')}); DPO and continued pre-training are not here yet")
    return records


def build_trainer(params: dict, precision: str, output_dir: str):
    """The TRL SFTTrainer on the train and validation splits, exactly as the stage runs it."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    cfg, method, seed = params["train"], params["method"], int(params["seed"])
    set_seed(seed)
    if not torch.cuda.is_available():
        score_only_answer_tokens()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=dtype)
    train_rows = [{"messages": r["messages"]} for r in chat_records(TRAIN)]
    eval_rows = [{"messages": r["messages"]} for r in chat_records(VALIDATION)]
    if not train_rows:
        raise StageError(f"{TRAIN}: no training records")
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=int(cfg["max_steps"]),
        num_train_epochs=float(cfg["num_train_epochs"]),
        per_device_train_batch_size=int(cfg["per_device_train_batch_size"]),
        per_device_eval_batch_size=int(cfg["per_device_eval_batch_size"]),
        gradient_accumulation_steps=int(cfg["gradient_accumulation_steps"]),
        learning_rate=float(cfg["learning_rate"]),
        lr_scheduler_type=cfg["lr_scheduler_type"],
        warmup_steps=float(cfg["warmup_ratio"]),  # a float below 1 is a ratio
        weight_decay=float(cfg["weight_decay"]),
        max_length=int(cfg["max_length"]),
        assistant_only_loss=True,
        chat_template_path=str(TEMPLATE),
        eval_strategy="steps" if eval_rows else "no",
        eval_steps=int(cfg["eval_steps"]),
        logging_steps=int(cfg["logging_steps"]),
        save_strategy="no",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,  # recomputation costs ~30% on CPU; memory is ample
        report_to=["wandb"],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",  # for tokens/s in the report
    )
    return SFTTrainer(
        model=model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        peft_config=peft_config(method),
    )


def main() -> None:
    params = load_params()
    method = params["method"]
    inputs = {"train": md5_path(TRAIN), "validation": md5_path(VALIDATION), "base": md5_path(BASE)}

    with tracking.stage_run("train", params, ["train", "method", "model"], inputs) as run:
        import torch

        precision = choose_precision(params["train"]["precision"])
        with tempfile.TemporaryDirectory(prefix="train-") as scratch:
            trainer = build_trainer(params, precision, scratch)
            train_rows, eval_rows = trainer.train_dataset, trainer.eval_dataset or []
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in trainer.model.parameters())
            start = time.perf_counter()
            result = trainer.train()
            seconds = time.perf_counter() - start
            evals = [h for h in trainer.state.log_history if "eval_loss" in h]
            if eval_rows and (not evals or evals[-1]["step"] != trainer.state.global_step):
                trainer.evaluate()  # the curve must end at the final weights
                evals = [h for h in trainer.state.log_history if "eval_loss" in h]

        with atomic_dir(OUT_DIR) as tmp:
            trainer.model.save_pretrained(tmp, safe_serialization=True)
            trainer.processing_class.save_pretrained(tmp)
            sort_adapter_config(Path(tmp) / "adapter_config.json")

        train_csv, eval_csv = loss_curves(trainer.state.log_history)
        write_text(PLOTS / "train_loss.csv", train_csv)
        write_text(PLOTS / "eval_loss.csv", eval_csv)
        tokens = trainer.state.num_input_tokens_seen or None
        report = {
            "method": method["name"],
            "precision": precision,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "parameters": {"trainable": trainable, "total": total},
            "optimizer_steps": trainer.state.global_step,
            "train_examples": len(train_rows),
            "validation_examples": len(eval_rows),
            "train_loss": round(result.training_loss, 4),
            "eval_loss": round(evals[-1]["eval_loss"], 4) if evals else None,
            "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, trainer.state.global_step), 2),
        }
        if tokens:
            report["tokens_per_second"] = round(tokens / seconds, 1)
        write_json(REPORT, report)
        run.summary.update({"train/final_loss": report["train_loss"],
                            "train/final_eval_loss": report["eval_loss"],
                            "train/trainable_parameters": trainable})
        print(f"train: {report['optimizer_steps']} steps in {seconds:.0f}s, "
              f"loss {report['train_loss']}, eval loss {report['eval_loss']}")


if __name__ == "__main__":
    run_stage(main)
