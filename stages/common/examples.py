"""Training examples: the token ids of a canonical record and the labels that carry loss; and
how a prompt is rendered for generation. The one home of both: validate counts with it, train
trains with it, export and evaluate prompt with it.

- chat records (messages, and ShareGPT, Alpaca and prompt/completion, which validate turned
  into messages): loss on the assistant turns only, through the `{% generation %}` markers of
  the training chat template (base_model chose it and proved that it renders the shipped
  template byte for byte and marks exactly what the model generates: each answer and its stop
  token). An assistant message with `weight: 0` (OpenAI's convention) is context, not a
  target. `train_on: all` puts loss on every token instead, system prompt included.
- raw text (continued pre-training): every token, with an end-of-sequence token appended so
  packed documents stay apart.
- preference records are scored as their prompt + chosen answer (DPO itself is TRL's: it
  renders prompt, chosen and rejected with the shipped template and scores the completions).
"""

from __future__ import annotations

from typing import get_args

from stages.common.schema import TrainOn

IGNORE = -100  # label of a token that carries no loss
TRAIN_ON = get_args(TrainOn)
BATCH = 512  # conversations rendered and tokenized per call


class ExampleError(ValueError):
    """A record the training template cannot turn into an example (the reason is the text)."""


def trained_turns(objective: dict) -> str:
    """The objective's `train_on` (sft's choice); the other objectives train on the answer."""
    return objective.get("train_on", "assistant")


def conversation(record: dict) -> list[dict]:
    """The messages a chat or preference record trains on (a preference record: the chosen)."""
    return record["messages"] if "messages" in record else [*record["prompt"], *record["chosen"]]


def _plain(messages: list[dict]) -> list[dict]:
    """Messages as chat templates read them: a canonical message (stages/common/kinds.py)
    without our per-turn training `weight`, which is no template's business."""
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


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


def _labels(ids: list[int], mask: list[int], messages: list[dict], train_on: str) -> list[int]:
    if train_on == "all":
        return list(ids)
    # each assistant message is one run of the mask, in order: silence the weight-0 ones
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    runs = _runs(mask)
    if len(runs) != len(weights):
        raise ExampleError(
            f"the training template marked {len(runs)} answers in a "
            f"conversation with {len(weights)} assistant messages"
        )
    labels = [t if bit else IGNORE for t, bit in zip(ids, mask)]
    for (start, end), weight in zip(runs, weights):
        if not weight:
            labels[start:end] = [IGNORE] * (end - start)
    return labels


def _encode(
    tokenizer, conversations: list[list[dict]], template: str, tools: list[dict] | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input ids, assistant mask) of each conversation; tools go to the template, which
    renders them its own way (into the system prompt, a tools block, ...)."""
    encoded = tokenizer.apply_chat_template(
        [_plain(c) for c in conversations],
        tools=tools,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(zip(encoded["input_ids"], encoded["assistant_masks"]))


def _check_calls_rendered(tokenizer, ids: list[int], mask: list[int], messages: list[dict]):
    """A template without tool support renders a call as an empty turn: training would teach
    the model to answer nothing. Each call's name must be in its turn's trained tokens."""
    answers = [m for m in messages if m["role"] == "assistant"]
    for (start, end), message in zip(_runs(mask), answers):
        turn = tokenizer.decode(ids[start:end])
        for call in message.get("tool_calls", []):
            if call["function"]["name"] not in turn:
                raise ExampleError(
                    f"the chat template does not render tool calls (the turn calling "
                    f"{call['function']['name']!r} renders as {turn[:60]!r}): use a model whose "
                    f"template supports tools, or set model.training_chat_template"
                )


def chat_examples(
    tokenizer,
    conversations: list[list[dict]],
    template: str,
    train_on: str = "assistant",
    collect_errors: bool = False,
    tools: list[list[dict] | None] | None = None,
) -> list:
    """input_ids and labels of each conversation, whole (callers cut at max_length); `tools`:
    each conversation's declared tools, if any. A conversation the template refuses raises
    ExampleError, or with `collect_errors` takes the ExampleError's place in the list."""
    from jinja2 import TemplateError

    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on}: use one of {', '.join(TRAIN_ON)}")
    tools = tools or [None] * len(conversations)
    out: list = []
    for start in range(0, len(conversations), BATCH):
        chunk = range(start, min(start + BATCH, len(conversations)))
        # conversations without tools render in one batch; those with tools one by one (each
        # declares its own), and so does every one of a batch that a bad conversation spoils
        batched = [i for i in chunk if not tools[i]]
        pairs: dict[int, tuple | ExampleError] = {}
        try:
            if batched:
                pairs |= dict(
                    zip(batched, _encode(tokenizer, [conversations[i] for i in batched], template))
                )
        except TemplateError:
            pairs = {}
        for i in (i for i in chunk if i not in pairs):
            try:
                pairs[i] = _encode(tokenizer, [conversations[i]], template, tools[i])[0]
            except TemplateError as err:
                pairs[i] = ExampleError(f"chat template: {str(err).splitlines()[0]}")
        for i in chunk:
            try:
                if isinstance(pairs[i], ExampleError):
                    raise pairs[i]
                ids, mask = list(pairs[i][0]), list(pairs[i][1])
                if tools[i] or any(m.get("tool_calls") for m in conversations[i]):
                    _check_calls_rendered(tokenizer, ids, mask, conversations[i])
                out.append(
                    {"input_ids": ids, "labels": _labels(ids, mask, conversations[i], train_on)}
                )
            except ExampleError as err:
                if not collect_errors:
                    raise
                out.append(err)
    return out


def text_example(tokenizer, text: str) -> dict:
    """Raw text for continued pre-training: every token trains, EOS closes the document."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def record_examples(
    tokenizer,
    records: list[dict],
    template: str,
    train_on: str = "assistant",
    collect_errors: bool = False,
) -> list:
    """The example of each canonical record, whatever its kind (see the module docstring)."""
    chats = [i for i, r in enumerate(records) if "text" not in r]
    built = chat_examples(
        tokenizer,
        [conversation(records[i]) for i in chats],
        template,
        train_on,
        collect_errors,
        [records[i].get("tools") for i in chats],
    )
    out: list = [None] * len(records)
    for i, example in zip(chats, built):
        out[i] = example
    for i, r in enumerate(records):
        if "text" in r:
            out[i] = text_example(tokenizer, r["text"])
    return out


def truncate(example: dict, max_length: int | None) -> dict:
    """The example cut to max_length tokens, keeping the start (as validate counted it)."""
    if not max_length:
        return example
    return {
        "input_ids": example["input_ids"][:max_length],
        "labels": example["labels"][:max_length],
    }


def trainable_tokens(example: dict) -> int:
    return sum(label != IGNORE for label in example["labels"])


def prompt_text(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """A conversation's prompt as generation sees it: the shipped template, generation prompt
    added (the training template renders the same text: base_model proved it)."""
    return tokenizer.apply_chat_template(
        _plain(messages), tools=tools or None, tokenize=False, add_generation_prompt=True
    )


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of prompt_text, as the served model tokenizes it."""
    return list(
        tokenizer.apply_chat_template(
            _plain(messages),
            tools=tools or None,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=True,
        )["input_ids"]
    )
