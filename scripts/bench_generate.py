"""Benchmark the evaluate stage's batched greedy generation against a one-at-a-time loop.

    python scripts/bench_generate.py                 # 48 test prompts, after `make repro`
    python scripts/bench_generate.py --examples 96 --batch-size 32 --model models/base

Both ways run the same prompts with `stages.evaluate.generate` (left padding, KV cache): once
in batches of `--batch-size`, once one prompt at a time. Prints examples per second of each,
the speed-up, and whether every answer is identical (it must be: greedy decoding with correct
padding and attention masks does not depend on the batch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/merged", help="model folder (default: tuned)")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    for needed in (Path(args.model) / "config.json", Path("data/processed/test.jsonl")):
        if not needed.exists():
            sys.exit(f"error: {needed} not found: run `make repro` first")

    from stages.common.config import setup_environment

    setup_environment()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.common.files import read_jsonl
    from stages.common.kinds import prompt_of
    from stages.evaluate import generate, prompt_texts

    tokenizer = AutoTokenizer.from_pretrained("models/base")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [r for r in read_jsonl(Path("data/processed/test.jsonl")) if prompt_of(r)]
    prompts = prompt_texts(tokenizer, rows[: args.examples])

    start = time.perf_counter()
    batched, _ = generate(model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    single = [generate(model, tokenizer, [p], 1, args.max_new_tokens)[0][0] for p in prompts]
    single_s = time.perf_counter() - start

    n = len(prompts)
    same = sum(a == b for a, b in zip(batched, single))
    print(
        f"{n} prompts, {args.max_new_tokens} new tokens at most, {torch.get_num_threads()} threads"
    )
    print(f"one at a time: {n / single_s:6.2f} examples/s ({single_s:.1f} s)")
    print(f"batched ({args.batch_size}):  {n / batched_s:6.2f} examples/s ({batched_s:.1f} s)")
    print(f"speed-up {single_s / batched_s:.2f}x; identical answers: {same}/{n}")
    if same != n:
        sys.exit("batched answers differ from one-at-a-time answers")


if __name__ == "__main__":
    main()
