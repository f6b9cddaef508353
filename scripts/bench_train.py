"""Benchmark the train stage against a plain TRL SFTTrainer: same model, data, batch and steps.

    python scripts/bench_train.py               # 10 optimizer steps each, after `make repro`
    python scripts/bench_train.py --steps 20 --model /path/to/hf-folder

Each side runs in its own process (clean peak memory, no shared patches):
- ours: `stages.train.build_trainer` exactly as the stage builds it from params.yaml
  (answer-only labels, padding-free batches, loss projected only at labelled positions);
- TRL: `SFTTrainer` with `messages` rows and a `LoraConfig`, as TRL's docs set it up, with only
  the CPU fixes (fp32, no gradient checkpointing) and the same LoRA, learning rate and batch.
Prints non-padding tokens per second of each, their ratio, peak memory, and our model FLOPs
utilisation against a fp32 (CPU) or bf16 (GPU) matmul peak measured in the same run. Model
FLOPs per token: 6 x non-embedding parameters for full fine-tuning, 4 x for LoRA (frozen
weights get no weight gradient); the LM head is left out because ours projects only labelled
positions through it. Needs models/base and data/processed/train.jsonl (`make repro`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_peak_gflops(device: str) -> float:
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    repeats = 20 if device == "cuda" else 5
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def peak_memory_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_train(trainer, device: str) -> dict:
    import torch

    start = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "steps": trainer.state.global_step,
        "peak_memory_gib": peak_memory_gib(device),
    }


def run_ours(params: dict, out_dir: str) -> dict:
    from stages import train

    precision = train.choose_precision(params["train"]["precision"])
    trainer = train.build_trainer(params, precision, out_dir)
    trainer.args.save_strategy = "no"  # no checkpoints in a speed test
    trainer.args.eval_strategy = "no"
    trainer.args.load_best_model_at_end = False
    return timed_train(trainer, device_of())


def run_trl(params: dict, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cfg, method = params["train"], params["method"]
    rows = [
        json.loads(line) for line in Path("data/processed/train.jsonl").read_text().splitlines()
    ]
    dataset = Dataset.from_list(
        [
            {"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
            for r in rows
        ]
    )
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        "models/base", dtype=torch.bfloat16 if cuda else torch.float32
    )
    args = SFTConfig(
        output_dir=out_dir,
        max_steps=int(cfg["max_steps"]),
        learning_rate=float(cfg["learning_rate"]),
        per_device_train_batch_size=int(cfg["per_device_train_batch_size"]),
        gradient_accumulation_steps=int(cfg["gradient_accumulation_steps"]),
        report_to=[],
        save_strategy="no",
        logging_steps=5,
        seed=int(params["seed"]),
        include_num_input_tokens_seen="non_padding",
        # the CPU fixes; on a GPU TRL's defaults (bf16, checkpointing) stand
        **({} if cuda else {"bf16": False, "activation_checkpointing": False, "use_cpu": True}),
    )
    peft = (
        None
        if method["name"] == "full"
        else LoraConfig(
            r=int(method["r"]),
            lora_alpha=int(method["alpha"]),
            lora_dropout=float(method["dropout"]),
            target_modules=method["target_modules"],
            task_type="CAUSAL_LM",
        )
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        processing_class=AutoTokenizer.from_pretrained("models/base"),
        train_dataset=dataset,
        peft_config=peft,
    )
    return timed_train(trainer, device_of())


def device_of() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def child(side: str, steps: int) -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"]["max_steps"] = steps
    params["launch"] = {"num_processes": 1}
    with tempfile.TemporaryDirectory() as out_dir:
        result = (run_ours if side == "ours" else run_trl)(params, out_dir)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per side")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args.side, args.steps)
    for needed in ("models/base/config.json", "data/processed/train.jsonl"):
        if not Path(needed).exists():
            sys.exit(f"error: {needed} not found: run `make repro` first")

    import torch

    from stages.common.config import setup_environment

    setup_environment()
    device = device_of()
    params = yaml.safe_load(Path("params.yaml").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("models/base")
    n_params = sum(p.numel() for p in model.parameters())
    n_body = n_params - model.get_input_embeddings().weight.numel()
    del model
    results = {}
    for side in ("trl", "ours"):
        done = subprocess.run(
            [sys.executable, __file__, "--side", side, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
                ),
            },
            check=False,
        )
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            sys.exit(f"{side} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        results[side] = json.loads(line[-1].removeprefix("RESULT "))
    peak = matmul_peak_gflops(device)
    flops_per_token = (6 if params["method"]["name"] == "full" else 4) * n_body
    print(
        f"device: {device} ({torch.get_num_threads()} threads), method "
        f"{params['method']['name']}, batch {params['train']['per_device_train_batch_size']}, "
        f"{args.steps} optimizer steps each, {n_params / 1e6:.1f} M parameters "
        f"({n_body / 1e6:.1f} M without embeddings)"
    )
    print(f"{'':6} {'tokens/s':>10} {'seconds':>8} {'tokens':>8} {'peak GiB':>9} {'MFU':>6}")
    for side, r in results.items():
        mfu = r["tokens_per_second"] * flops_per_token / (peak * 1e9)
        print(
            f"{side:6} {r['tokens_per_second']:10.1f} {r['seconds']:8.1f} {r['tokens']:8d} "
            f"{r['peak_memory_gib']:9.2f} {mfu:6.1%}"
        )
    print(
        f"ratio ours / TRL: "
        f"{results['ours']['tokens_per_second'] / results['trl']['tokens_per_second']:.2f}"
        f" (non-padding tokens per second); matmul peak {peak:.0f} GFLOP/s "
        f"({'bf16' if device == 'cuda' else 'fp32'})"
    )


if __name__ == "__main__":
    main()
