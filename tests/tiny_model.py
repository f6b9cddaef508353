"""Tiny random llamas with their own byte-level BPE tokenizer, built in about 0.1 s each.

`build_tiny_model` wears SmolLM2's chat-template shape (ChatML with a default system prompt, no
{% generation %} markers), so the tests exercise the path the demo model takes.
`build_family_model` wears the real chat template of a popular family (Llama 3.1, Qwen 2.5,
Qwen 3, Gemma 3, Phi-3: the files TRL ships in trl/chat_templates/), with that family's special
tokens added to the tokenizer and its stop tokens in the generation config.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# family -> the chat template file in trl/chat_templates, bos, eos, pad, the family's other
# special tokens, its plain added tokens, the tokens generation stops at (generation_config),
# and what the template writes before the answer of a final turn (Qwen 3's empty reasoning).
FAMILIES = {
    "llama3_1": {
        "template": "llama3_1.jinja",
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|finetune_right_pad_id|>",
        "special": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>", "<|eom_id|>"],
        "stops": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    },
    "qwen2_5": {
        "template": "qwen2_5.jinja",
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "special": ["<|im_start|>"],
        "stops": ["<|im_end|>", "<|endoftext|>"],
    },
    "qwen3": {
        "template": "qwen3.jinja",
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "special": ["<|im_start|>"],
        "added": ["<think>", "</think>"],
        "stops": ["<|im_end|>", "<|endoftext|>"],
        "final_turn_prefix": "<think>\n\n</think>\n\n",
    },
    "gemma3": {
        "template": "gemma3.jinja",
        "bos": "<bos>",
        "eos": "<eos>",
        "pad": "<pad>",
        "special": ["<start_of_turn>", "<end_of_turn>"],
        "stops": ["<eos>", "<end_of_turn>"],
    },
    "phi3": {
        "template": "phi3.jinja",
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "special": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "stops": ["<|endoftext|>", "<|assistant|>", "<|end|>"],
    },
}


def _bpe(corpus: list[str], special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    return bpe


def _save_llama(folder: Path, tokenizer, dtype=None, eos_ids=None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids or tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_model(folder: Path, corpus: list[str]) -> Path:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(corpus, SPECIAL),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return _save_llama(folder, tokenizer)


def build_family_model(folder: Path, corpus: list[str], family: str) -> Path:
    """A tiny bf16 llama whose tokenizer wears `family`'s real chat template and tokens."""
    import torch
    import trl
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    special = [t for t in (spec["bos"], spec["eos"], spec["pad"], *spec["special"]) if t]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(corpus, list(dict.fromkeys(special))),
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
    )
    tokenizer.add_tokens(spec.get("added", []))
    tokenizer.chat_template = (
        Path(trl.__file__).parent / "chat_templates" / spec["template"]
    ).read_text(encoding="utf-8")
    stop_ids = tokenizer.convert_tokens_to_ids(spec["stops"])
    return _save_llama(folder, tokenizer, torch.bfloat16, stop_ids)


def trained_runs(tokenizer, example: dict) -> list[str]:
    """The decoded text of each run of tokens that carries loss in a training example."""
    from stages.common.examples import IGNORE

    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def ticket_corpus(raw_file: Path, limit: int = 400) -> list[str]:
    texts = []
    for line in raw_file.read_text(encoding="utf-8").splitlines()[:limit]:
        try:
            texts += [m["content"] for m in json.loads(line)["messages"]]
        except (ValueError, KeyError, TypeError):
            continue
    return texts
