"""base_model: a model folder, GGUF file or hub snapshot becomes models/base, weights copied in
their own dtype, with a training chat template that puts loss on exactly what the model
generates, or a one-line error saying what to set. (The five popular families run end to end
in test_families.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import set_params, use_model
from tiny_model import trained_runs
from transformers import AutoTokenizer

from stages import base_model
from stages.common import chat_templates
from stages.common.config import StageError
from stages.common.examples import chat_examples

CONVERSATION = [
    {"role": "system", "content": "Triage."},
    {"role": "user", "content": "Order 5 is late."},
    {"role": "assistant", "content": '{"urgency": "high"}'},
    {"role": "user", "content": "Any news?"},
    {"role": "assistant", "content": "Not yet."},
]

# Templates shaped like ones real model repositories ship (none of them is in TRL's list).
LLAMA2_LIKE = (  # bos + [INST] turns, the answer after a space, EOS after another space
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
ZEPHYR_LIKE = (  # the turn's EOS is followed by a newline, and user turns end in EOS too
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n' + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
SYSTEM_IN_LAST_USER = (  # the system prompt moves to whichever user turn is last
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% if loop.last and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
NO_STOP_TOKEN = (  # answers never end with a token generation stops at
    "{% for m in messages %}{% if m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}\n\n"
    "{% else %}### Instruction:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
CHATML_WRONG_MARKERS = (  # ships markers, but around the role header too
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ '<|im_start|>assistant\n' + message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TRAINING = (  # what a user would write: the answer and its stop token marked
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def wearing(tiny_model_dir, folder, template: str):
    """A copy of the tiny model whose tokenizer ships `template`."""
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


def trained(folder, messages) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = (folder / "chat_template_training.jinja").read_text()
    return trained_runs(tokenizer, chat_examples(tokenizer, [messages], template)[0])


def report(project) -> dict:
    return json.loads((project / "reports/base_model.json").read_text())


def test_local_folder_becomes_base_with_a_derived_training_template(project):
    base_model.main()
    out = project / "models/base"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "generation_config.json").exists()
    r = report(project)
    assert r["parameters"] > 0 and r["dtype"] == "float32" and r["family"] == "llama"
    # SmolLM2's shape of ChatML is unknown to TRL: our derivation, checked exactly
    assert r["training_template"]["source"] == "derived"
    assert r["training_template"]["exact_check"] and r["training_template"]["probes"] >= 4
    assert r["training_template"]["stop_tokens"] == ["<|im_end|>"]
    # the newline after <|im_end|> is never generated, so it never trains
    assert trained(out, CONVERSATION) == ['{"urgency": "high"}<|im_end|>', "Not yet.<|im_end|>"]


@pytest.mark.parametrize(
    "template, expected",
    [
        (LLAMA2_LIKE, [' {"urgency": "high"} <|im_end|>', " Not yet. <|im_end|>"]),
        (ZEPHYR_LIKE, ['{"urgency": "high"}<|im_end|>', "Not yet.<|im_end|>"]),
    ],
)
def test_held_out_templates_train_on_what_the_model_generates(
    project, tiny_model_dir, tmp_path, template, expected
):
    # what follows the generation prompt up to the stop token, leading space or newline included
    use_model(project, wearing(tiny_model_dir, tmp_path / "m", template))
    base_model.main()
    assert report(project)["training_template"]["source"] == "derived"
    assert trained(project / "models/base", CONVERSATION) == expected


@pytest.mark.parametrize(
    "template, why",
    [
        (SYSTEM_IN_LAST_USER, "not prefix-preserving"),
        (NO_STOP_TOKEN, "not followed by any stop token"),
    ],
)
def test_templates_that_cannot_be_proven_stop_with_what_to_set(
    project, tiny_model_dir, tmp_path, template, why
):
    use_model(project, wearing(tiny_model_dir, tmp_path / "m", template))
    with pytest.raises(
        StageError,
        match=rf"model family 'llama'.*{why}.*"
        r"set model.training_chat_template",
    ) as err:
        base_model.main()
    assert "\n" not in str(err.value)
    assert not (project / "models/base").exists()


def test_shipped_markers_that_mark_the_header_are_rejected(project, tiny_model_dir, tmp_path):
    use_model(project, wearing(tiny_model_dir, tmp_path / "m", CHATML_WRONG_MARKERS))
    base_model.main()
    chosen = report(project)["training_template"]
    assert chosen["source"] == "derived"
    assert "<|im_start|>assistant" in chosen["rejected"]["shipped"]
    assert trained(project / "models/base", CONVERSATION) == [
        '{"urgency": "high"}<|im_end|>',
        "Not yet.<|im_end|>",
    ]


def test_configured_training_template_is_used_and_checked(project, tmp_path):
    outside = tmp_path / "train.jinja"  # not a dependency of base_model: refused
    outside.write_text(CHATML_TRAINING)
    set_params(project, **{"model.training_chat_template": str(outside)})
    with pytest.raises(
        StageError,
        match=r"model.training_chat_template=.*not a dependency of "
        r"the base_model stage.*conf/chat_templates",
    ):
        base_model.main()
    path = project / "conf/chat_templates/train.jinja"
    path.write_text(CHATML_TRAINING)
    set_params(project, **{"model.training_chat_template": "conf/chat_templates/train.jinja"})
    base_model.main()
    assert report(project)["training_template"]["source"].startswith("model.training_chat_template")
    # one that marks the role header as well is refused, not trusted
    wrong = CHATML_TRAINING.replace(
        "{{ '<|im_start|>assistant\n' }}{% generation %}",
        "{% generation %}{{ '<|im_start|>assistant\n' }}",
    )
    assert wrong != CHATML_TRAINING
    path.write_text(wrong)
    with pytest.raises(StageError, match=r"model.training_chat_template.*trains"):
        base_model.main()


def test_derived_template_refuses_a_record_it_cannot_prove(tiny_model_dir):
    # a template that is prefix-preserving on the probes can still meet a record where it is
    # not: the derived template raises on that record instead of training the wrong tokens
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    derived = chat_templates.derive(SYSTEM_IN_LAST_USER, ["<|im_end|>"])
    assert chat_examples(tokenizer, [CONVERSATION[1:3]], derived)  # no system prompt: fine
    with pytest.raises(ValueError, match="not prefix-preserving"):
        chat_examples(tokenizer, [CONVERSATION], derived)


def test_bf16_hub_snapshot_from_the_cache_is_copied_as_is_with_its_commit(
    project, tiny_model_dir, tmp_path, monkeypatch
):
    import huggingface_hub
    import torch
    from transformers import AutoModelForCausalLM

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / commit
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    set_params(project, **{"model.name_or_path": "acme/tiny-chat", "model.revision": "main"})
    base_model.main()
    r = report(project)
    assert r["resolved_commit"] == commit and r["dtype"] == "bfloat16"
    assert len(r["source_md5"]) == 32
    # the weights are the snapshot's bytes, not a re-save
    assert (project / "models/base/model.safetensors").read_bytes() == (
        snapshot / "model.safetensors"
    ).read_bytes()

    set_params(project, **{"model.revision": "v2"})
    with pytest.raises(
        StageError,
        match=r"acme/tiny-chat@v2: not in the local Hugging Face "
        r"cache; set model.allow_download: true",
    ):
        base_model.main()


def test_missing_sources_are_clear_errors():
    with pytest.raises(StageError, match="folder not found"):
        base_model.resolve_source("./no/such/model")
    with pytest.raises(StageError, match="not installed"):
        base_model.resolve_source("package:no_such_package_xyz/model.gguf")
    with pytest.raises(StageError, match="folder not found"):
        base_model.resolve_source("no-such-folder")
