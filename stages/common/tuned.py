"""How a tuned model is stored and loaded. models/merged holds merged weights (LoRA, DoRA,
QLoRA, IA3: the adapter folded in; full: the weights themselves), or, for the adapters that
cannot fold into the weights (prefix and prompt tuning: learned virtual tokens), the base's
weights with the adapter beside them in ADAPTER_DIR. Export writes it; export's own check,
evaluate and serve load it through `load`.

A reward model (objective=reward) is the base with a one-score head in place of the language
model head (transformers' *ForSequenceClassification): it scores a whole conversation, and
`reward_scores` is how every stage asks it."""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_DIR = "adapter"  # inside models/merged: the adapter that runs with its weights


def mergeable(model) -> bool:
    """Whether `model` (a PEFT model, or a plain one) can fold its adapter into its weights."""
    config = getattr(model, "peft_config", None)
    return not config or not any(c.is_prompt_learning for c in config.values())


def save(model, folder: Path) -> None:
    """A model export checked: plain weights, or the base's weights and the adapter beside."""
    if mergeable(model):
        model.save_pretrained(folder, safe_serialization=True)
        return
    model.get_base_model().save_pretrained(folder, safe_serialization=True)
    model.save_pretrained(Path(folder) / ADAPTER_DIR, safe_serialization=True)


def is_reward_model(folder: Path) -> bool:
    """Whether `folder` (models/tuned or models/merged) holds a reward model: an adapter
    trained for sequence classification, or weights with a sequence-classification head."""
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        return config.get("task_type") == "SEQ_CLS"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load_reward_base(folder: Path, **kwargs):
    """The model in `folder` with a one-score head (new and untrained on a language model),
    padded as its tokenizer pads: the head reads the last token that is not padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, **kwargs)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(folder).pad_token_id
    return model


def load(folder: Path, dtype, device: str):
    """The model in `folder` (models/base or models/merged) in `dtype` on `device`."""
    from transformers import AutoModelForCausalLM

    # straight onto `device`: an 8B model in fp32 is never staged in RAM on its way to the GPU
    if is_reward_model(folder):
        return load_reward_base(folder, dtype=dtype, device_map=device)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
    if (Path(folder) / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, Path(folder) / ADAPTER_DIR)
    return model


def virtual_tokens(model) -> int:
    """Positions prompt tuning puts before every input (its logits come first); 0 otherwise
    (prefix tuning extends the attention, not the sequence)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or type(config).__name__ != "PromptTuningConfig":
        return 0
    return config.num_virtual_tokens


def conversation_ids(tokenizer, messages: list[dict], tools=None) -> list[int]:
    """A whole conversation's tokens as a reward model reads them: the tokenizer's chat
    template, as TRL's RewardTrainer renders its pairs."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tools=tools, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def reward_scores(model, sequences: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """The reward model's score of each token sequence, in batches padded on the right."""
    import torch

    scores: list[float] = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.tensor(
            [sequences[i] + [pad_id] * (width - len(sequences[i])) for i in idx],
            device=model.device,
        )
        mask = torch.tensor(
            [[1] * len(sequences[i]) + [0] * (width - len(sequences[i])) for i in idx],
            device=model.device,
        )
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
        for i, value in zip(idx, logits.tolist()):
            scores[i] = value
    return scores
