"""How a tuned model is stored and loaded. models/merged holds merged weights (LoRA, DoRA,
QLoRA, IA3: the adapter folded in; full: the weights themselves), or, for the adapters that
cannot fold into the weights (prefix and prompt tuning: learned virtual tokens), the base's
weights with the adapter beside them in ADAPTER_DIR. Export writes it; export's own check,
evaluate and serve load it through `load`."""

from __future__ import annotations

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


def load(folder: Path, dtype, device: str):
    """The model in `folder` (models/base or models/merged) in `dtype` on `device`."""
    from transformers import AutoModelForCausalLM

    # straight onto `device`: an 8B model in fp32 is never staged in RAM on its way to the GPU
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
