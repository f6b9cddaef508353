"""Training examples: the token ids of a canonical record and the labels that carry loss.

The train stage tokenizes every record here, once, and hands TRL ready `input_ids` + `labels`,
so which tokens train is decided in one readable place (and tested by decoding them):

- chat records (messages, and ShareGPT, Alpaca and prompt/completion, which validate turned
  into messages): loss on assistant turns only, through the `{% generation %}` markers of the
  training chat template (base_model derived it and proved it renders the shipped template
  byte for byte). An assistant message with `weight: 0` (OpenAI's convention) is context, not
  a target. `train_on: all` puts loss on every token instead, system prompt included.
- raw text (continued pre-training): every token, with an end-of-sequence token appended so
  packed documents stay apart.

Preference records go to TRL's DPOTrainer as they are (it renders prompt, chosen and rejected
with the shipped template and scores the completions only).
"""

from __future__ import annotations

IGNORE = -100  # label of a token that carries no loss
TRAIN_ON = ("assistant", "all")


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of 1s."""
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def chat_example(tokenizer, messages: list[dict], template: str, train_on: str = "assistant",
                 max_length: int | None = None) -> dict:
    """input_ids and labels of one conversation; truncation keeps the start (as validate
    counted under `data.length_policy: truncate`)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    encoded = tokenizer.apply_chat_template(plain, chat_template=template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if train_on == "all":
        mask = [1] * len(ids)
    else:
        # each assistant message is one run of the mask, in order: silence the weight-0 ones
        weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
        runs = _runs(mask)
        if len(runs) != len(weights):
            raise ValueError(f"template marked {len(runs)} assistant spans for "
                             f"{len(weights)} assistant messages")
        for (start, end), weight in zip(runs, weights):
            if not weight:
                mask[start:end] = [0] * (end - start)
    labels = [t if bit else IGNORE for t, bit in zip(ids, mask)]
    if max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def text_example(tokenizer, text: str) -> dict:
    """Raw text for continued pre-training: every token trains, EOS closes the document."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def prompt_ids(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    """Token ids of a conversation's prompt as generation sees it (generation prompt added)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    kwargs = {"chat_template": template} if template else {}
    return list(tokenizer.apply_chat_template(plain, tokenize=True, return_dict=True,
                                              add_generation_prompt=True, **kwargs)["input_ids"])


def trainable_tokens(example: dict) -> int:
    return sum(label != IGNORE for label in example["labels"])
