"""Stage export: the tuned model as one plain Hugging Face folder, in the base model's dtype,
proven to answer as trained.

1. Merge: base + adapter is loaded once, in fp32 (on the GPU when it fits, else on the CPU),
   and the adapter is folded into the base in place (for QLoRA, into the unquantized base):
   one copy of the model, never two. For method=full the tuned model is the merged model.
   Prefix and prompt tuning cannot merge (their adapter is virtual tokens, not weights):
   models/merged then holds the base's weights with the adapter beside them in adapter/
   (stages/common/tuned.py loads both), and the report says so.
2. Save in the base's dtype (bf16 stays bf16), with the tokenizer and the shipped chat template,
   so `transformers serve`, vLLM or `from_pretrained` load it as is.
3. Round trip, on `export.check_examples` test prompts, with greedy decoding:
   - the exported tokenizer and template give the prompt tokens training used;
   - the merged model answers exactly as base + adapter did (both fp32: merging is exact there);
   - the folder, loaded back from disk, answers exactly as the saved weights did in memory.
   Rounding fp32 to a 16-bit dtype can flip a near-tie, which is no bug: how many answers it
   changed is reported, not failed.
   A mismatch fails the stage, naming the first example that differs.
   A reward model (objective=reward) is checked the same way on scores: both sides of each
   test pair, to 1e-3.

Outputs: models/merged/, reports/export.json.
"""

from __future__ import annotations

import math
import time
from functools import partial

from stages.common import memory, paths, tracking, tuned
from stages.common.config import StageError, load_params, run_stage
from stages.common.examples import prompt_ids, record_examples
from stages.common.files import atomic_dir, md5_path, read_jsonl, safetensors_summary, write_json
from stages.common.kinds import prompt_of

BASE, TUNED, MERGED, TEMPLATE = paths.BASE, paths.TUNED, paths.MERGED, paths.TRAINING_TEMPLATE
TEST = paths.TEST
REPORT = paths.stage_report("export")


def choose_device(fp32_bytes: int) -> str:
    """The GPU when the fp32 model fits in its free memory (with room for generation), else the
    CPU when it fits there; otherwise a clear error before anything is loaded."""
    import torch

    need = int(fp32_bytes * 1.2)
    if torch.cuda.is_available() and memory.available_bytes("cuda") > need:
        return "cuda"
    memory.require(
        "export",
        need,
        {"fp32 weights": fp32_bytes, "generation": need - fp32_bytes},
        "cpu",
        "merge on a machine with more memory",
    )
    return "cpu"


def tuned_model(device: str):
    """base + adapter (unmerged), or the fully fine-tuned model, in fp32 on `device`; a
    reward model with its score head."""
    import torch
    from transformers import AutoModelForCausalLM

    if (TUNED / "adapter_config.json").exists():
        from peft import PeftModel

        load = (
            tuned.load_reward_base
            if tuned.is_reward_model(TUNED)
            else (AutoModelForCausalLM.from_pretrained)
        )
        base = load(BASE, dtype=torch.float32, device_map=device)
        return PeftModel.from_pretrained(base, TUNED)
    return tuned.load(TUNED, torch.float32, device)


def greedy_answers(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import torch

    answers = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=model.device)
            out = model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens
            )
            answers.append(out[0, len(ids) :].tolist())
    return answers


def reward_scores(model, sequences: list[list[int]], pad_id: int) -> list[float]:
    return tuned.reward_scores(model, sequences, pad_id, batch_size=8)


def same(a, b) -> bool:
    """Greedy answers are equal token for token; reward scores agree to 1e-3 (merging folds
    the adapter into the weights exactly in fp32 only up to float rounding)."""
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3)
    return a == b


def first_difference(expected: list, got: list) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(expected, got)) if not same(a, b)), None)


def main() -> None:
    """1. the test prompts to check with; 2. base + adapter answers them, then merges (in
    fp32) and must answer the same; 3. save models/merged in the base's dtype; 4. the saved
    chat template renders the prompts training used; 5. models/merged, loaded from disk,
    answers as the saved weights did; 6. the report."""
    params = load_params()
    cfg = params["export"]
    inputs = {"base": md5_path(BASE), "tuned": md5_path(TUNED), "test": md5_path(TEST)}

    with tracking.stage_run("export", params, ["export", "method"], inputs) as run:
        import torch
        from transformers import AutoTokenizer

        n_params, dtype_name = safetensors_summary(BASE)
        dtype = getattr(torch, dtype_name)  # the base's dtype: models/merged keeps it
        device = choose_device(4 * n_params)
        tokenizer = AutoTokenizer.from_pretrained(BASE)
        records = [r for r in read_jsonl(TEST) if prompt_of(r)][: cfg["check_examples"]]
        where = [
            f"{TEST} line {i + 1} (source {r['source']}:{r['line']})" for i, r in enumerate(records)
        ]
        reward = tuned.is_reward_model(TUNED)
        if reward:  # a reward model answers with a score of each side of each test pair
            where = [w for w in where for _side in ("chosen", "rejected")]
            prompts = [
                tuned.conversation_ids(tokenizer, r["prompt"] + r[side], r.get("tools"))
                for r in records
                for side in ("chosen", "rejected")
            ]
            answer = partial(reward_scores, sequences=prompts, pad_id=tokenizer.pad_token_id)
        else:
            prompts = [prompt_ids(tokenizer, prompt_of(r), r.get("tools")) for r in records]
            answer = partial(greedy_answers, prompts=prompts, max_new_tokens=cfg["max_new_tokens"])
        start = time.perf_counter()

        model = tuned_model(device).eval()
        adapter = (TUNED / "adapter_config.json").exists()
        expected = answer(model)
        if adapter and tuned.mergeable(model):
            model = model.merge_and_unload()  # in place: the adapter's weights are folded in
            expect_same(expected, answer(model), where, tokenizer, "merged model", "base + adapter")
        model.to(dtype)  # in place, to the base's dtype
        with atomic_dir(MERGED) as tmp:
            tuned.save(model, tmp)  # an adapter that cannot merge is kept beside the weights
            tokenizer.save_pretrained(tmp)
        saved = answer(model.float()) if dtype != torch.float32 else expected
        del model
        if reward:
            check_conversation_tokens(records, prompts, where)
        else:
            check_prompt_tokens(records, prompts, tokenizer, where)
        reloaded = tuned.load(MERGED, torch.float32, device).eval()
        answers = answer(reloaded)
        expect_same(
            saved, answers, where, tokenizer, "models/merged loaded from disk", "the saved weights"
        )
        unchanged = sum(same(a, b) for a, b in zip(expected, answers))
        seconds = time.perf_counter() - start
        report = build_report(params, adapter, device, dtype, reloaded, len(records), unchanged)
        if reward:  # what was compared: scores, not answers
            report["round_trip"]["reward_scores_match"] = report["round_trip"].pop(
                "greedy_answers_match"
            )
        report["round_trip"]["seconds"] = round(seconds, 1)
        write_json(REPORT, report)
        run.summary.update({"export/round_trip_examples": len(records)})
        rounding = f" ({unchanged} unchanged by rounding to {report['dtype']})"
        print(
            f"export: {MERGED} written ({report['dtype']}); {len(records)} test prompts give "
            f"the training prompt tokens and the "
            + ("reward scores" if reward else "answers")
            + " of base + adapter"
            + (rounding if dtype != torch.float32 else "")
            + (f"; {report['merged_from']}" if report["merged_from"].startswith("not") else "")
        )


# --- the checks of main ---------------------------------------------------------------------


def build_report(params, adapter, device, dtype, reloaded, examples, unchanged) -> dict:
    return {
        "method": params["method"]["name"],
        "merged_from": merged_from(params["method"]["name"], adapter, reloaded),
        "merged_on": device,
        "merge_dtype": "float32",
        "dtype": str(dtype).removeprefix("torch."),  # what models/merged holds
        "size_bytes": sum(p.stat().st_size for p in MERGED.glob("*.safetensors")),
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "round_trip": {
            "examples": examples,
            "max_new_tokens": params["export"]["max_new_tokens"],
            "prompt_tokens_match": True,
            "greedy_answers_match": True,
            # answers the rounding to `dtype` left as they were in fp32
            "unchanged_by_rounding": unchanged,
        },
    }


def merged_from(method: str, adapter: bool, model) -> str:
    if not adapter:
        return "full fine-tune"
    if tuned.mergeable(model):
        return "base + adapter"
    return f"not merged: {method} tuning keeps its adapter, beside the base in {tuned.ADAPTER_DIR}/"


def expect_same(expected: list, got: list, where: list[str], tokenizer, who: str, whom: str):
    """Stop at the first prompt where `who` answers (or scores) otherwise than `whom`."""
    if (k := first_difference(expected, got)) is not None:
        if isinstance(got[k], float):
            raise StageError(
                f"round trip: {where[k]}: {who} scores {got[k]:.5f}, {whom} {expected[k]:.5f}"
            )
        raise StageError(
            f"round trip: {where[k]}: {who} answers {tokenizer.decode(got[k])!r}, "
            f"{whom} {tokenizer.decode(expected[k])!r}"
        )


def check_conversation_tokens(records: list[dict], sequences: list, where: list[str]) -> None:
    """The tokenizer saved in models/merged renders each scored conversation as the base's did
    (as RewardTrainer rendered the pairs it trained on)."""
    from transformers import AutoTokenizer

    exported_tokenizer = AutoTokenizer.from_pretrained(MERGED)
    for k, (r, side) in enumerate((r, side) for r in records for side in ("chosen", "rejected")):
        if (
            tuned.conversation_ids(exported_tokenizer, r["prompt"] + r[side], r.get("tools"))
            != (sequences[k])
        ):
            raise StageError(
                f"round trip: {where[k]}: the exported chat template renders the {side} "
                f"conversation in other tokens than training used"
            )


def check_prompt_tokens(records: list[dict], prompts: list, tokenizer, where: list[str]) -> None:
    """The tokenizer saved in models/merged renders each prompt as the base's did, and as the
    start of the example training built from it."""
    from transformers import AutoTokenizer

    exported_tokenizer = AutoTokenizer.from_pretrained(MERGED)
    template = TEMPLATE.read_text(encoding="utf-8")
    for k, r in enumerate(records):
        served = prompt_ids(exported_tokenizer, prompt_of(r), r.get("tools"))
        with_answer = {"messages": [*prompt_of(r), {"role": "assistant", "content": "x"}]}
        if r.get("tools"):  # the declared tools are part of the prompt
            with_answer["tools"] = r["tools"]
        trained = record_examples(tokenizer, [with_answer], template)[0]
        if served != prompts[k] or trained["input_ids"][: len(served)] != served:
            raise StageError(
                f"round trip: {where[k]}: the exported chat template renders "
                f"other prompt tokens than training used"
            )


if __name__ == "__main__":
    run_stage(main)
