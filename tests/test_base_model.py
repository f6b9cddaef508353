"""base_model: a local model folder becomes models/base with a verified training template."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from stages import base_model
from stages.common.config import StageError

SMOLLM2_SHIPPED = (  # the chat template inside the embedded GGUF file (tokenizer.chat_template)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_local_folder_becomes_base_with_training_template(project):
    base_model.main()
    out = project / "models/base"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    training = (out / "chat_template_training.jinja").read_text()
    assert "{% generation %}" in training
    report = json.loads((project / "reports/base_model.json").read_text())
    assert report["parameters"] > 0 and report["training_template_verified_on"] >= 3


def test_training_template_renders_like_smollm2_and_masks_only_answers(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    training = base_model.add_generation_markers(SMOLLM2_SHIPPED)
    assert training is not None
    assert base_model.renders_identically(tokenizer, SMOLLM2_SHIPPED, training) == []

    messages = [{"role": "system", "content": "Triage."},
                {"role": "user", "content": "Order 5 is late."},
                {"role": "assistant", "content": '{"urgency": "high"}'},
                {"role": "user", "content": "Any news?"},
                {"role": "assistant", "content": "Not yet."}]
    enc = tokenizer.apply_chat_template(messages, chat_template=training, return_dict=True,
                                        return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    # exactly the assistant answers and their end-of-turn tokens carry loss
    assert tokenizer.decode(trained) == '{"urgency": "high"}<|im_end|>Not yet.<|im_end|>'


def test_unknown_template_family_is_a_clear_error():
    assert base_model.add_generation_markers("{{ messages[0]['content'] }}") is None


def test_missing_folder_is_a_clear_error():
    with pytest.raises(StageError, match="folder not found"):
        base_model.resolve_source("./no/such/model")
    with pytest.raises(StageError, match="not installed"):
        base_model.resolve_source("package:no_such_package_xyz/model.gguf")
