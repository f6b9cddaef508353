"""One W&B run per stage execution.

- offline by default (`tracking.mode`); an exported WANDB_MODE wins (`disabled` in tests), and
  the log and the run's config say so, so an `online` left in a shell is never a surprise;
- `group` = the DVC experiment name (`DVC_EXP_NAME`, "workspace" under `dvc repro`), so every
  stage of one experiment sits together; `job_type` = the stage; tags = the params the
  experiment changed against its baseline (`train.learning_rate=0.002`), for filtering sweeps;
- `config` = the params sections the stage declares in dvc.yaml, the md5 of each input, the git
  revision and the DVC experiment context, so a metric change traces to a data version;
- runs live under `<repo>/wandb-runs/wandb/` (found through DVC_ROOT), outside `.dvc/tmp/exps/`,
  so runs of queued experiments survive their temporary workspace; the folder's name is not a
  Python identifier, so no `import wandb` can mistake it for the package (a folder `wandb/` in
  the project root shadows the real package for any python started there without it).
  Upload later with `make wandb-sync`;
- W&B starts before the stage's work: if it cannot, the stage stops at once (one line). A W&B
  failure after the work is printed and written to `wandb-runs/failures.jsonl`, and the stage's
  outputs stand.

Secrets never enter the config: only params and hashes do; W&B reads WANDB_API_KEY itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stages.common.config import StageError, project_root

RUNS_DIR = "wandb-runs"  # under the project root; W&B adds its own `wandb/` level inside


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "rev": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain")),
    }


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

    shown = subprocess.run(
        ["git", "show", f"{baseline}:params.yaml"], capture_output=True, text=True, check=False
    )
    if shown.returncode:
        return []
    before, now = _leaves(yaml.safe_load(shown.stdout) or {}), _leaves(params)
    changed = [f"{k}={now[k]}" for k in sorted(now) if before.get(k) != now[k]]
    return [tag[:64] for tag in changed[:20]]  # W&B tags: at most 64 characters


def runs_dir() -> Path:
    return project_root() / RUNS_DIR


def mode_in_effect(params: dict) -> dict[str, Any]:
    """The W&B mode this process runs with, and where it came from."""
    configured = params["tracking"]["mode"]
    env = os.environ.get("WANDB_MODE")
    return {
        "configured": configured,
        "effective": env or configured,
        "from_environment": bool(env) and env != configured,
    }


def _from_wandb(err: BaseException) -> bool:
    """Whether an exception was raised inside the wandb package (not by the stage's work)."""
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    module = last.tb_frame.f_globals.get("__name__", "") if last else ""
    return module == "wandb" or module.startswith("wandb.")


def _write_down(stage: str, what: str, err: BaseException) -> None:
    line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    print(
        f"{stage}: warning: W&B failed {what} ({line}); the stage's outputs stand, see "
        f"{RUNS_DIR}/failures.jsonl",
        file=sys.stderr,
    )
    try:
        with (runs_dir() / "failures.jsonl").open("a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "stage": stage,
                        "group": experiment_group(),
                        "what": what,
                        "error": line,
                    }
                )
                + "\n"
            )
    except OSError:
        pass


@contextmanager
def stage_run(stage: str, params: dict, sections: list[str], inputs_md5: dict[str, str | None]):
    """Open the stage's run before the work; finish it (failed on exception) when the block
    ends. A W&B failure at the start stops the stage; one after the work is written down."""
    import wandb

    tracking = params["tracking"]
    mode = mode_in_effect(params)
    if mode["from_environment"]:
        print(
            f"{stage}: WANDB_MODE={mode['effective']} from the environment overrides "
            f"tracking.mode={mode['configured']}",
            file=sys.stderr,
        )
    os.environ["WANDB_MODE"] = mode["effective"]
    root = runs_dir()
    os.environ.setdefault("WANDB_DIR", str(root))
    os.environ.setdefault("WANDB_CACHE_DIR", str(root / ".cache"))
    os.environ.setdefault("WANDB_DATA_DIR", str(root / ".data"))
    root.mkdir(exist_ok=True)
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
        "tracking_mode": mode,
    }
    try:
        run = wandb.init(
            project=tracking["project"],
            entity=tracking["entity"] or None,
            group=group,
            job_type=stage,
            name=f"{group}-{stage}",
            tags=list(tracking["tags"]) + swept_params(params),
            config=config,
            dir=os.environ["WANDB_DIR"],
            settings=wandb.Settings(
                console="off", silent=True, x_disable_stats=not tracking["system_metrics"]
            ),
        )
    except Exception as err:  # noqa: BLE001  (any W&B failure: stop before the work)
        raise StageError(
            f"W&B could not start the {stage} run in mode {mode['effective']} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            f"); run without tracking with tracking.mode=disabled"
        ) from None
    try:
        yield run
    except BaseException as err:
        if isinstance(err, Exception) and _from_wandb(err):
            _write_down(stage, "while logging", err)  # the work before it is done and written
        else:
            try:
                run.finish(exit_code=1)
            except Exception as finish_err:  # noqa: BLE001
                _write_down(stage, "to close the failed run", finish_err)
            raise
    try:
        run.finish()
    except Exception as err:  # noqa: BLE001  (the outputs are written; keep them)
        _write_down(stage, "to close the run", err)
