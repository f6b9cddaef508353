"""Disk and memory each method needs, computed from a model's shapes (no weights loaded).

    python scripts/model_sizes.py                      # SmolLM2-135M, Qwen2.5-1.5B, Llama-3.1-8B
    python scripts/model_sizes.py --r 64               # another LoRA rank

Parameters are counted on an empty (meta-device) model built from the architecture, LoRA's
trainable parameters from the shapes of the linear layers it wraps (`all-linear`: every linear
layer but the LM head). Bytes per parameter:
- weights on disk in the source dtype (bf16: 2); the embedded demo is fp32 (4, de-quantized);
- training on a GPU in bf16: LoRA/DoRA base 2 B, QLoRA base ~0.53 B for linear weights (NF4 with
  double quantization) and 2 B for the rest; trainable weights in fp32 with their gradient and
  AdamW's two moments: 16 B each; full fine-tuning in pure bf16: weights, gradients and AdamW
  moments in bf16: 8 B;
- export merges in fp32: 4 B (one copy);
activations come on top; the train stage measures them in its plan (`make plan`).
"""

from __future__ import annotations

import argparse

GiB = 2**30
ARCHITECTURES = {  # name -> (transformers config class, shapes), from the models' config.json
    "SmolLM2-135M": (
        "LlamaConfig",
        {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
        },
    ),
    "Qwen2.5-1.5B": (
        "Qwen2Config",
        {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
        },
    ),
    "Llama-3.1-8B": (
        "LlamaConfig",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "tie_word_embeddings": False,
        },
    ),
}


def counts(config_class: str, shapes: dict, r: int) -> dict:
    """Total parameters, those in linear layers LoRA wraps, and LoRA's / DoRA's trainable."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config = getattr(transformers, config_class)(**shapes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    linear = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    ]
    wrapped = sum(m.weight.numel() for m in linear)
    lora = sum(r * (m.in_features + m.out_features) for m in linear)
    return {
        "total": total,
        "linear": wrapped,
        "lora": lora,
        "dora": lora + sum(m.out_features for m in linear),
    }


def sizes(n: dict, source_bytes: float) -> dict[str, dict[str, float]]:
    """GiB per method: disk (models/base, models/tuned, models/merged) and memory (train
    without activations, export)."""
    other = n["total"] - n["linear"]
    base = n["total"] * source_bytes
    out = {}
    for method in ("lora", "dora", "qlora", "full"):
        trainable = n["total"] if method == "full" else n["dora" if method == "dora" else "lora"]
        if method == "full":
            train = 8 * n["total"]
            tuned = 2 * n["total"]
        else:
            weights = (0.53 * n["linear"] + 2 * other) if method == "qlora" else 2 * n["total"]
            train = weights + 16 * trainable
            tuned = 4 * trainable
        out[method] = {
            "trainable": trainable,
            "base": base / GiB,
            "tuned": tuned / GiB,
            "merged": base / GiB,
            "train": train / GiB,
            "export": 4 * n["total"] / GiB,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (method.r)")
    args = parser.parse_args()
    print(
        f"LoRA rank {args.r} on every linear layer; GiB; train = GPU memory before "
        f"activations; export = fp32 merge"
    )
    print(
        "| model | params | method | trainable | models/base | models/tuned | models/merged "
        "| train | export |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (config_class, shapes) in ARCHITECTURES.items():
        n = counts(config_class, shapes, args.r)
        source_bytes = 4 if name == "SmolLM2-135M" else 2  # the demo's GGUF becomes fp32
        for method, s in sizes(n, source_bytes).items():
            print(
                f"| {name} | {n['total'] / 1e9:.2f} B | {method} | {s['trainable'] / 1e6:,.1f} M "
                f"| {s['base']:.2f} | {s['tuned']:.3f} | {s['merged']:.2f} | {s['train']:.1f} "
                f"| {s['export']:.1f} |"
            )


if __name__ == "__main__":
    main()
