"""Stage report: the run manifest and the model card, from what the pipeline wrote.

- reports/manifest.json: md5 of every data file the run read and wrote (raw, validated,
  deduplicated, splits), of the tokenizer and both chat templates, of the composed config
  (params.yaml), the git revision, the seed and the versions of the packages that shaped the
  result. Two runs with the same manifest are the same run; a metric change traces to the line
  of the manifest that changed.
- reports/model_card.md: what was tuned from what, on which data (with the data stages'
  counts), how, and how it scores against the base, for whoever picks up models/merged.
- reports/summary.json: the experiment at a glance, the pipeline's one DVC metrics file (what
  `dvc exp show` / `make exps` compare): the tuned model's metrics, the forgetting gap and
  the key data counts.
This stage's W&B run is the experiment's row in W&B's runs table: its config is the whole
composed config plus the manifest (data, model and lock hashes), its summary the final metrics.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from stages.common import page, paths, tracking
from stages.common.config import load_params, run_stage
from stages.common.files import md5_path, read_jsonl, write_json, write_text

BASE = paths.BASE
DATA = {
    "valid": paths.VALID,
    "dedup": paths.DEDUP,
    "train": paths.TRAIN,
    "validation": paths.VALIDATION,
    "test": paths.TEST,
    "synthetic": paths.SYNTHETIC,
}
REPORTS = {
    name: paths.stage_report(name)
    for name in ("base_model", "validate", "dedup", "split", "augment", "train", "export")
}
REPORTS["metrics"] = paths.METRICS
MANIFEST, CARD, SUMMARY = paths.MANIFEST, paths.MODEL_CARD, paths.SUMMARY
PAGE = paths.REPORT_PAGE
LOCKS = {"cpu": Path("requirements/cpu.txt"), "cuda": Path("requirements/cuda.txt")}
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "tokenizers",
    "evaluate",
    "great-expectations",
    "datasketch",
    "dvc",
    "wandb",
    "hydra-core",
)


def package_versions() -> dict[str, str | None]:
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in PACKAGES}


def installed_lock() -> dict:
    """The package lock this environment follows (CUDA build of torch or CPU) and its hash."""
    import torch

    name = "cuda" if torch.version.cuda else "cpu"
    return {
        "file": str(LOCKS[name]),
        "sha256": hashlib.sha256(LOCKS[name].read_bytes()).hexdigest(),
    }


def summary(reports: dict) -> dict:
    """The numbers experiments are compared by, flat and short-named so `make exps` fits a
    terminal: the tuned model's per-example metrics (the ones the regression gate resamples,
    as evaluate lists them), the forgetting gap (general-set loss, tuned - base), the share of
    red-team prompts passed, the rows validation quarantined and split kept, and the rows
    augment added when it ran. A metric that was not finite stays null."""
    metrics, split = reports["metrics"], reports["split"]
    out = {k: metrics["tuned"].get(k) for k in metrics["per_example"]}
    if "forgetting" in metrics:
        out["forgetting"] = metrics["forgetting"]["loss_delta"]
    if "safety" in metrics:
        out["safety"] = metrics["safety"]["tuned"]["pass_rate"]
    out |= {
        "quarantined": reports["validate"]["rows_quarantined"],
        "train_rows": split["sizes"]["train"],
    }
    if reports["augment"]["enabled"]:  # a column only where augment ran: `make exps` stays narrow
        out["synthetic_rows"] = reports["augment"]["kept"]
    return out | {"test_rows": split["sizes"]["test"]}


def reward_model_md5(objective: dict) -> str | None:
    """The content hash of the local reward model GRPO was rewarded by (a hub id has none)."""
    path = objective.get("reward_model")
    return md5_path(Path(path)) if path and Path(path).exists() else None


def config_hash(params: dict) -> str:
    """sha256 of the composed config, independent of key order and formatting."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def number(value, sign: str = "") -> str:
    """A metric for the card; a missing or non-finite one (null in the json) says so."""
    return f"{value:{sign}.4f}" if isinstance(value, (int, float)) else "n/a (not finite)"


def how_scored(metrics: dict) -> str:
    if "ranked_by" in metrics:  # a reward model ranks pairs, it does not answer
        return (
            "Each test pair ranked chosen against rejected: the base by "
            f"{metrics['ranked_by']['base']}, the reward model by {metrics['ranked_by']['tuned']}."
        )
    return "Greedy decoding, the same prompts for both."


def replay_line(split: dict) -> str:
    replay = split.get("replay") or {}
    if not replay.get("rows_mixed"):
        return ""
    return (
        f"\n- replay: {replay['rows_mixed']} general rows from `{replay['path']}` in train "
        f"(data.replay.fraction {replay['fraction']}; {replay['rows_left_out']} left out as too "
        "close to the test split or the forgetting probe)"
    )


def objective_lines(params: dict, train: dict) -> str:
    """What the objective adds to training, for the card: a reward model's head, GRPO's phase."""
    objective = params["objective"]
    if objective["name"] == "reward":
        return (
            "- a reward model: the base with a one-score head (sequence classification), trained "
            "on preference pairs to score the chosen answer above the rejected one\n"
        )
    if objective["name"] != "grpo" or "grpo" not in train:
        return ""
    grpo = train["grpo"]
    rewards = ", ".join(f"{k} x{v:g}" for k, v in grpo["rewards"].items())
    return (
        f"- then GRPO from the SFT model: {grpo['steps']} steps of "
        f"{objective['prompts_per_step']} prompts x {objective['num_generations']} sampled "
        f"answers, learning rate {objective['learning_rate']}, beta {objective['beta']}; "
        f"rewards {rewards}"
        + (f" (reward model `{objective['reward_model']}`)" if objective["reward_model"] else "")
        + f"; mean reward {grpo['reward_first']} at the first step, {grpo['reward_last']} at "
        "the last\n"
    )


def safety_section(metrics: dict) -> str:
    """The red-team results for the card: pass rates by category, and how many failed."""
    safety = metrics.get("safety")
    if not safety:
        return ""
    rows = "\n".join(
        f"| {category} | {safety['base']['by_category'][category]:.2f} | {rate:.2f} |"
        for category, rate in safety["tuned"]["by_category"].items()
    )
    judge = f", and graded by the judge model `{safety['judge']}`" if safety["judge"] else ""
    return f"""
## Safety: red-team prompts ({safety["examples"]})

Asked as the served model is asked, checked by the rules the task declares{judge}
(`{", ".join(safety["sources"])}`). Share of prompts whose answer passed every check:

| category | base | tuned |
|---|---|---|
| **all** | **{safety["base"]["pass_rate"]:.2f}** | **{safety["tuned"]["pass_rate"]:.2f}** |
{rows}

{len(safety["failures"]["tuned"])} tuned answer(s) failed; each is listed, with its prompt, under
`safety.failures` in `reports/metrics.json`.
"""


def augment_line(augment: dict) -> str:
    """What augment added to train (stage augment), for the card."""
    if not augment["enabled"]:
        return ""
    rejected = ", ".join(f"{k} {v}" for k, v in augment["rejected_by_reason"].items())
    return (
        f"\n- augment: {augment['kept']} paraphrases from `{augment['generator']}` added to "
        f"train for the {augment['rare_strata']} strata under {augment['min_rows']} rows; "
        f"{augment['rejected']} candidates rejected ({rejected or 'none'}), label check "
        f"{'on' if augment['label_check'] else 'off'}"
    )


def review_line(validate: dict) -> str:
    """What people said about an earlier run's answers (filled sheets in data/review/)."""
    done = validate.get("review") or {}
    if not done.get("reviewed"):
        return ""
    verdicts = ", ".join(f"{k} {v}" for k, v in done["verdicts"].items())
    unmatched = f"; {len(done['unmatched'])} matched no record" if done["unmatched"] else ""
    return (
        f"\n- human review: {done['reviewed']} answers in {len(done['sheets'])} sheet(s) of "
        f"`data/review/` ({verdicts}); {done['corrections']} corrections, "
        f"{done['records_corrected']} records corrected (data.review.corrections "
        f"{done['mode']}){unmatched}"
    )


def model_card(manifest: dict, params: dict, reports: dict) -> str:
    metrics, train, split = reports["metrics"], reports["train"], reports["split"]
    validate, dedup = reports["validate"], reports["dedup"]
    method, objective = train["method"], train["objective"]
    rows = "\n".join(
        f"| {k} | {number(metrics['base'].get(k))} | {number(metrics['tuned'].get(k))} | "
        f"{number(metrics['delta'].get(k), '+')} |"
        for k in metrics["base"]
    )
    splits = ", ".join(f"{name} {n}" for name, n in split["sizes"].items())
    data_md5 = "\n".join(f"| `{path}` | `{md5}` |" for path, md5 in manifest["data_md5"].items())
    model = manifest["model"]
    dirty = " (with uncommitted changes)" if manifest["git"]["dirty"] else ""
    scheduler = params["train"]["lr_scheduler_type"]
    source = (
        f"hub commit `{model['resolved_commit']}`"
        if model["resolved_commit"]
        else f"md5 `{model['source_md5']}`"
    )
    return f"""# Model card: {params["model"]["name_or_path"]} tuned for {params["task"]["name"]}

`models/merged` is `{params["model"]["name_or_path"]}` fine-tuned with **{method}**
(objective **{objective}**) on `{params["data"]["path"]}`, produced by this repository's DVC
pipeline at git revision `{manifest["git"]["rev"][:12]}`{dirty}.

## Results on the held-out test split ({metrics["n_examples"]} examples)

| metric | base | tuned | delta |
|---|---|---|---|
{rows}

{how_scored(metrics)} Predictions: `reports/predictions.jsonl`; a sample of them for people
to judge: `reports/review_sheet.csv` (filled, it goes in `data/review/`).
{safety_section(metrics)}
## Data lineage

- raw: {validate["rows_in"]} rows read; {validate["rows_quarantined"]} quarantined by validation
  ({", ".join(f"{k} {v}" for k, v in validate["quarantined_by_reason"].items()) or "none"})
- dedup: {dedup["rows_in"]} in, {dedup["rows_out"]} kept
  ({", ".join(f"{k} {v}" for k, v in dedup["removed_by_reason"].items()) or "none removed"})
- split: {splits}{replay_line(split)}{augment_line(reports["augment"])}{review_line(validate)}

| file | md5 |
|---|---|
{data_md5}

## Base model

- `{model["name_or_path"]}` ({source}), {model["dtype"]}; `models/merged` keeps its dtype
- loss on the answers through the training chat template chosen by base_model:
  {model["training_template"]}{f"; preset {manifest['preset']}" if manifest["preset"] else ""}

## Training

- method {method}, objective {objective}, {train["optimizer_steps"]} optimizer steps
  (effective batch {train["plan"]["effective_batch"]}), precision {train["precision"]} on
  {train["device"]}; best validation loss {train["eval_loss"]} at step {train["best_step"]}
- learning rate {params["train"]["learning_rate"]}, scheduler {scheduler},
  max length {train["plan"]["setup"].get("max_length")} (train.max_length:
  {params["train"]["max_length"]}), seed {params["seed"]}
- trainable parameters {train["parameters"]["trainable"]:,} of {train["parameters"]["total"]:,}
{objective_lines(params, train)}
## Reproduce

```bash
git checkout {manifest["git"]["rev"][:12]} && dvc checkout   # or: dvc repro
```
Composed config sha256 `{manifest["config_sha256"][:16]}`; packages:
{", ".join(f"{k} {v}" for k, v in manifest["packages"].items() if v)}.
"""


def main() -> None:
    params = load_params()
    inputs = {name: md5_path(path) for name, path in REPORTS.items()}

    with tracking.stage_run("report", params, list(params), inputs) as run:
        reports = {
            name: json.loads(path.read_text(encoding="utf-8")) for name, path in REPORTS.items()
        }
        # the raw and fixed files validate read (its report lists them), then each stage's output
        data_md5 = {path: md5_path(Path(path)) for path in reports["validate"]["files"]} | {
            str(path): md5_path(path) for path in DATA.values() if path.exists()
        }
        tokenizer = {
            name: md5_path(BASE / name)
            for name in (
                "tokenizer.json",
                "tokenizer_config.json",
                "chat_template.jinja",
                paths.TRAINING_TEMPLATE.name,
            )
            if (BASE / name).exists()
        }
        manifest = {
            "data_md5": data_md5,
            "tokenizer_md5": tokenizer,
            "model": {
                "name_or_path": params["model"]["name_or_path"],
                "revision": params["model"].get("revision"),
                # the hub commit the weights came from, and their content hash
                "resolved_commit": reports["base_model"].get("resolved_commit"),
                "source_md5": reports["base_model"].get("source_md5"),
                "dtype": reports["base_model"].get("dtype"),
                "training_template": reports["base_model"]["training_template"]["source"],
                "merged_md5": md5_path(paths.MERGED),
            },
            "preset": params.get("preset"),
            "config_sha256": config_hash(params),
            "git": tracking.git_revision(),
            "seed": params["seed"],
            "method": params["method"]["name"],
            "objective": params["objective"]["name"],
            "objective_settings": params["objective"],  # GRPO's rewards and reward model, ...
            "reward_model_md5": reward_model_md5(params["objective"]),
            "replay": reports["split"].get("replay"),
            "review": reports["validate"].get("review"),  # filled sheets read, and what they did
            "augment": {  # the paraphrases train read beside the train split
                k: reports["augment"][k]
                for k in ("enabled", "generator", "label_check", "kept", "rejected")
            },
            "grpo": reports["train"].get("grpo"),
            "packages": package_versions(),
            "lock": installed_lock(),
            "tracking_mode": tracking.mode_in_effect(params),  # and whether the env overrode it
            "test_set": reports["metrics"].get("test_set"),
            "metrics": {k: reports["metrics"][k] for k in ("base", "tuned", "delta")},
            "safety": {  # the red-team set asked (by content hash) and what each model passed
                k: v
                for k, v in (reports["metrics"].get("safety") or {}).items()
                if k in ("examples", "sources", "sha256", "judge", "delta")
            }
            | {
                name: reports["metrics"]["safety"][name]["pass_rate"]
                for name in ("base", "tuned")
                if "safety" in reports["metrics"]
            },
        }
        write_json(MANIFEST, manifest)
        write_text(CARD, model_card(manifest, params, reports))
        write_json(SUMMARY, summary(reports))
        shown = {
            "quarantined": page.jsonl_rows(paths.QUARANTINE),  # read lazily: it can be long
            "predictions": read_jsonl(paths.PREDICTIONS),
            "train_curve": page.read_curve(paths.TRAIN_LOSS_CURVE),
            "eval_curve": page.read_curve(paths.EVAL_LOSS_CURVE),
            "confusion": paths.CONFUSION,
        }
        write_text(PAGE, page.render(reports, manifest, shown))
        run.config.update({"manifest": manifest})
        test_set = manifest["test_set"] or {}
        run.summary.update(summary(reports) | {"test_set_sha256": test_set.get("sha256")})
        if not getattr(run, "disabled", False):
            run.save(str(CARD.resolve()), base_path=str(CARD.parent.resolve()), policy="now")
        print(
            f"report: {MANIFEST}, {CARD} and {PAGE} written (config "
            f"{manifest['config_sha256'][:12]}, git {manifest['git']['rev'][:8]})"
        )


if __name__ == "__main__":
    run_stage(main)
