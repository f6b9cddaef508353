"""Stage export: the tuned model as one plain Hugging Face folder, proven to answer as trained.

1. Merge: the adapter is folded into the base weights (for QLoRA, into the unquantized base);
   for method=full the tuned model is the merged model. The folder gets the tokenizer and the
   shipped chat template, so `transformers serve`, vLLM or `from_pretrained` load it as is.
2. Round trip, on `export.check_examples` test prompts:
   - the merged folder's tokenizer and template render the same prompt tokens as training
     did (the training template's tokens of the same conversation, up to the answer);
   - greedy answers of the merged model, loaded back from disk, equal those of base + adapter.
   A mismatch fails the stage, naming the first example that differs.

Outputs: models/merged/, reports/export.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from stages.common import tracking
from stages.common.config import StageError, load_params, run_stage
from stages.common.examples import chat_example, prompt_ids
from stages.common.files import atomic_dir, md5_path, read_jsonl, write_json
from stages.common.kinds import prompt_of

BASE, TUNED, MERGED = Path("models/base"), Path("models/tuned"), Path("models/merged")
TEMPLATE = BASE / "chat_template_training.jinja"
TEST = Path("data/processed/test.jsonl")
REPORT = Path("reports/export.json")


def tuned_model(dtype):
    """base + adapter (unmerged), or the fully fine-tuned model."""
    from transformers import AutoModelForCausalLM

    if (TUNED / "adapter_config.json").exists():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(BASE, dtype=dtype)
        return PeftModel.from_pretrained(base, TUNED)
    return AutoModelForCausalLM.from_pretrained(TUNED, dtype=dtype)


def greedy_ids(model, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                             do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                        device=model.device))
    return out[0, len(ids):].tolist()


def main() -> None:
    params = load_params()
    cfg = params["export"]
    inputs = {"base": md5_path(BASE), "tuned": md5_path(TUNED), "test": md5_path(TEST)}

    with tracking.stage_run("export", params, ["export", "method"], inputs) as run:
        import copy

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # merged and compared in fp32: a bf16 merge rounds W + BA, which can flip a greedy
        # token against base + adapter for reasons that are not a bug
        dtype = torch.float32
        tokenizer = AutoTokenizer.from_pretrained(BASE)
        tuned = tuned_model(dtype).to(device).eval()
        adapter = hasattr(tuned, "merge_and_unload")
        # merge a copy: the unmerged model is the reference of the round trip
        merged = copy.deepcopy(tuned).merge_and_unload() if adapter else tuned
        with atomic_dir(MERGED) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        del merged

        records = [r for r in read_jsonl(TEST) if prompt_of(r)][: int(cfg["check_examples"])]
        exported_tokenizer = AutoTokenizer.from_pretrained(MERGED)
        exported = AutoModelForCausalLM.from_pretrained(MERGED, dtype=dtype).to(device).eval()
        template = TEMPLATE.read_text(encoding="utf-8")
        max_new = int(cfg["max_new_tokens"])
        start = time.perf_counter()
        for r in records:
            where = f"{TEST} line {r['line']} (source {r['source']}:{r['line']})"
            messages = prompt_of(r)
            served = prompt_ids(exported_tokenizer, messages)
            trained = chat_example(tokenizer, [*messages, {"role": "assistant", "content": "x"}],
                                   template)["input_ids"]
            if trained[: len(served)] != served:
                raise StageError(f"round trip: {where}: the exported chat template renders other "
                                 f"prompt tokens than training used")
            expected, got = greedy_ids(tuned, served, max_new), greedy_ids(exported, served, max_new)
            if expected != got:
                raise StageError(
                    f"round trip: {where}: merged model answers {tokenizer.decode(got)!r}, "
                    f"base + adapter {tokenizer.decode(expected)!r}")
        seconds = time.perf_counter() - start

        report = {
            "method": params["method"]["name"],
            "merged_from": "base + adapter" if adapter else "full fine-tune",
            "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in exported.parameters()),
            "round_trip": {"examples": len(records), "max_new_tokens": max_new,
                           "prompt_tokens_match": True, "greedy_answers_match": True,
                           "seconds": round(seconds, 1)},
        }
        write_json(REPORT, report)
        run.summary.update({"export/round_trip_examples": len(records)})
        print(f"export: {MERGED} written; {len(records)} test prompts give the same tokens and "
              f"the same greedy answers as base + adapter")


if __name__ == "__main__":
    run_stage(main)
