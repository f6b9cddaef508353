"""Keep the reward model of an objective=reward run as models/reward, versioned by DVC
(`make reward-model`), so a later GRPO run can be rewarded by it.

    dvc exp run -n rm -S objective=reward     # models/merged is now the reward model
    make reward-model                         # models/merged -> models/reward, `dvc add`ed
    git add models/reward.dvc models/.gitignore

Every experiment's model is models/merged (one pipeline, one set of outputs); a reward model
has to outlive the next run, so it gets a folder and a .dvc file of its own: its content hash
is in git, its bytes in the DVC cache (and remote, after `dvc push`). Declare models/reward
under the train stage's deps in dvc.yaml (train refuses an undeclared reward model) and run
`dvc exp run -S objective=grpo -S objective.reward_model=models/reward ...` (README, RLHF recipe).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.common import paths, tuned  # noqa: E402

KEPT = Path("models/reward")


def main() -> None:
    if not (paths.MERGED / "config.json").exists() or not tuned.is_reward_model(paths.MERGED):
        sys.exit(
            f"{paths.MERGED} is not a reward model: run `dvc exp run -S objective=reward` "
            "(or `dvc exp apply <its name>`) first"
        )
    staging = KEPT.with_name(KEPT.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(paths.MERGED, staging)
    shutil.rmtree(KEPT, ignore_errors=True)
    staging.rename(KEPT)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "add", str(KEPT)], check=False, capture_output=True
    )
    if done.returncode:
        sys.exit(f"dvc add {KEPT} failed: {done.stderr.decode(errors='replace').strip()}")
    print(
        f"{KEPT} holds the reward model of {paths.MERGED}, tracked by {KEPT}.dvc; next:\n"
        f"  git add {KEPT}.dvc models/.gitignore\n"
        f"  add `- {KEPT}` under the train stage's deps in dvc.yaml, then\n"
        f"  dvc exp run -S objective=grpo -S objective.reward_model={KEPT} "
        "-S +objective.rewards.reward_model=0.5"
    )


if __name__ == "__main__":
    main()
