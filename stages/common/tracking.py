"""One W&B run per stage execution.

- offline by default (`tracking.mode`; the env var WANDB_MODE wins, e.g. `disabled` in tests);
- `group` = the DVC experiment name (`DVC_EXP_NAME`, "workspace" under `dvc repro`), so every
  stage of one experiment sits together; `job_type` = the stage; tags = the params the
  experiment changed against its baseline (`train.learning_rate=0.002`), for filtering sweeps;
- `config` = the params sections the stage declares in dvc.yaml, the md5 of each input, the git
  revision and the DVC experiment context, so a metric change traces to a data version;
- runs live under `<repo>/wandb/` (found through DVC_ROOT), outside `.dvc/tmp/exps/`, so runs of
  queued experiments survive their temporary workspace. Upload later with `make wandb-sync`.

Secrets never enter the config: only params and hashes do; W&B reads WANDB_API_KEY itself.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from typing import Any

from stages.common.config import project_root


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"rev": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain"))}


def experiment_group() -> str:
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out |= _leaves(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): tree}


def swept_params(params: dict) -> list[str]:
    """`key=value` for each param this DVC experiment changed against its baseline commit
    (what `dvc exp run -S` / a queued sweep set), so W&B can filter and compare on them."""
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if not baseline:
        return []
    import yaml

    shown = subprocess.run(["git", "show", f"{baseline}:params.yaml"], capture_output=True,
                           text=True, check=False)
    if shown.returncode:
        return []
    before, now = _leaves(yaml.safe_load(shown.stdout) or {}), _leaves(params)
    changed = [f"{k}={now[k]}" for k in sorted(now) if before.get(k) != now[k]]
    return [tag[:64] for tag in changed[:20]]  # W&B tags: at most 64 characters


@contextmanager
def stage_run(stage: str, params: dict, sections: list[str], inputs_md5: dict[str, str | None]):
    """Open the stage's run; finish it (failed on exception) when the block ends."""
    import wandb

    tracking = params.get("tracking", {})
    os.environ.setdefault("WANDB_MODE", tracking.get("mode", "offline"))
    root = project_root()
    os.environ.setdefault("WANDB_DIR", str(root))
    os.environ.setdefault("WANDB_CACHE_DIR", str(root / "wandb" / ".cache"))
    os.environ.setdefault("WANDB_DATA_DIR", str(root / "wandb" / ".data"))
    (root / "wandb").mkdir(exist_ok=True)
    group = experiment_group()
    config = {
        "stage": stage,
        "params": {s: params.get(s) for s in sections},
        "seed": params.get("seed"),
        "data_md5": inputs_md5,
        "git": git_revision(),
        "dvc": {
            "exp_name": os.environ.get("DVC_EXP_NAME"),
            "baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
        },
    }
    run = wandb.init(
        project=tracking.get("project", "llm-finetune"),
        entity=tracking.get("entity") or None,
        group=group,
        job_type=stage,
        name=f"{group}-{stage}",
        tags=list(tracking.get("tags") or []) + swept_params(params),
        config=config,
        dir=os.environ["WANDB_DIR"],
        settings=wandb.Settings(
            console="off", silent=True, x_disable_stats=not tracking.get("system_metrics", False)
        ),
    )
    try:
        yield run
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
