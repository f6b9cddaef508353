"""Answers from a model: a local one (batched `generate`) or any OpenAI-compatible endpoint.

evaluate answers the test and red-team prompts with `generate` (greedy); augment samples
paraphrases with it, or asks an endpoint (`Endpoint`), the same client the red-team judge uses.
An endpoint is {base_url, model, api_key_env, timeout}: the key comes from the environment
variable it names and never lands in params or reports.
"""

from __future__ import annotations

import os

from stages.common.config import StageError


def generate(
    model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int
) -> tuple[list[str], int]:
    """Greedy answers, and how many of them the token budget cut before their stop token."""
    answers, cut = answer_prompts(model, tokenizer, prompts, batch_size, max_new_tokens)
    return answers, sum(cut)


def answer_prompts(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
) -> tuple[list[str], list[bool]]:
    """Answers (greedy at temperature 0, sampled above it: seed torch first), batched by similar
    length with left padding; and whether the token budget cut each before its stop token."""
    import torch

    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    cut = [False] * len(prompts)
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
        for i, seq in zip(idx, out):
            new = seq[enc["input_ids"].shape[1] :]
            cut[i] = len(new) == max_new_tokens and not stops & set(new.tolist())
            answers[i] = tokenizer.decode(new, skip_special_tokens=True)
    # a reasoning model (Qwen3, DeepSeek-R1) writes <think>...</think> first; the answer follows
    return [a.rsplit("</think>", 1)[-1].strip() for a in answers], cut


class Endpoint:
    """An OpenAI-compatible chat endpoint; `key` names the params entry it came from, for errors."""

    def __init__(self, cfg: dict, key: str):
        import openai

        self.cfg, self.key = cfg, key
        self.client = openai.OpenAI(
            base_url=cfg["base_url"],
            api_key=os.environ.get(cfg["api_key_env"]) or "unset",
            timeout=float(cfg["timeout"]),
            max_retries=2,
        )

    def reply(
        self, messages: list[dict], temperature: float, max_tokens: int, seed: int | None = None
    ) -> tuple[str, bool]:
        """The endpoint's answer to `messages`, and whether `max_tokens` cut it; an unreachable
        or failing endpoint stops the stage with one line naming it."""
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.cfg["model"],
                messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                temperature=temperature,
                max_tokens=max_tokens,
                **({"seed": seed} if seed is not None else {}),
            )
        except openai.OpenAIError as err:
            raise StageError(
                f"{self.key}: {self.cfg['base_url']} ({self.cfg['model']}): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from None
        choice = reply.choices[0]
        return (choice.message.content or "").strip(), choice.finish_reason == "length"
