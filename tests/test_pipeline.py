"""End to end through DVC on the tiny model, in a fresh git repo made from the template:
`dvc repro` produces every declared output, a second `dvc repro` reruns nothing, and
`dvc exp run -S ...` shows in `dvc exp show --json` with its metrics."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_template, declare_dependency
from helpers import read_offline_run

from stages.common import tuned

pytestmark = pytest.mark.slow
GIT_ID = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def sh(cwd: Path, *cmd: str, env: dict) -> str:
    out = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert out.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout + out.stderr


def make_repo(tmp_path: Path, tiny_model_dir: Path) -> Path:
    repo = copy_template(tmp_path / "repo", raw_rows=240)
    # a config group for the tiny model, selected in the defaults list like a user would
    (repo / "conf/model/tiny.yaml").write_text(
        f"name_or_path: {tiny_model_dir}\nrevision: null\nallow_download: false\n"
        "training_chat_template: null\n"
    )
    declare_dependency(repo, "base_model", tiny_model_dir)  # a local model folder, as users do
    train = yaml.safe_load((repo / "conf/train/default.yaml").read_text())
    train.update(max_steps=4, eval_steps=2, logging_steps=1, per_device_train_batch_size=4)
    (repo / "conf/train/tiny.yaml").write_text(yaml.safe_dump(train))
    config = (repo / "conf/config.yaml").read_text()
    config = config.replace("model: smollm2_135m", "model: tiny").replace(
        "train: default", "train: tiny"
    )
    (repo / "conf/config.yaml").write_text(config)
    evaluation = yaml.safe_load((repo / "conf/eval/default.yaml").read_text())
    evaluation.update(max_new_tokens=12, batch_size=8, max_examples=8, min_safety=None)
    (repo / "conf/eval/default.yaml").write_text(yaml.safe_dump(evaluation))
    (repo / "conf/data/tickets.yaml").write_text(
        (repo / "conf/data/tickets.yaml")
        .read_text()
        .replace("max_rejected_fraction: 0.2", "max_rejected_fraction: 0.5")
    )
    return repo


def committed_repo(tmp_path: Path, tiny_model_dir: Path, wandb_mode: str) -> tuple[Path, dict]:
    """make_repo's project with params composed, as the first commit of a fresh git repo; and
    the environment to run git, DVC and the stages there."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_DIR", "DVC_ROOT")}
    env.update(
        GIT_ID,
        WANDB_MODE=wandb_mode,
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site"),
    )
    repo = make_repo(tmp_path, tiny_model_dir)
    sh(repo, sys.executable, "-m", "stages.common.compose", env=env)
    sh(repo, "git", "init", "-q", "-b", "main", env=env)
    sh(repo, "git", "add", "-A", env=env)
    sh(repo, "git", "commit", "-qm", "template", env=env)
    return repo, env


def test_repro_then_nothing_reruns_then_experiment(tmp_path, tiny_model_dir):
    repo, env = committed_repo(tmp_path, tiny_model_dir, wandb_mode="offline")
    py = sys.executable

    out = sh(repo, py, "-m", "dvc", "repro", env=env)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert f"Running stage '{name}'" in out
    for name, stage in stages.items():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            assert (repo / path).exists(), f"{name}: declared output {path} missing"
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics["base"]) == set(metrics["tuned"])
    for report in ("validate", "dedup", "split"):
        data = json.loads((repo / f"reports/{report}.json").read_text())
        assert data["rows_in"] >= data["rows_out"] > 0
    # every stage left a finished offline W&B run, with its inputs' md5 in the config
    runs = [read_offline_run(d) for d in (repo / "wandb-runs" / "wandb").glob("offline-run-*")]
    assert sorted(r["config"]["stage"] for r in runs) == sorted(stages)
    for run in runs:
        assert run["state"] == "finished", run["name"]
        md5s = run["config"]["data_md5"]
        assert md5s and all(len(v) == 32 for v in md5s.values()), md5s

    again = sh(repo, py, "-m", "dvc", "repro", env=env)
    assert "Running stage" not in again

    # a changed file that a param names makes the stage that reads it stale
    for rel, stage in [
        ("data/general/instructions.jsonl", "evaluate"),
        ("data/eval/tickets_test.jsonl", "split"),
        ("conf/accelerate/ddp.yaml", "train"),
        ("conf/chat_templates/README.md", "base_model"),
    ]:
        original = (repo / rel).read_bytes()
        (repo / rel).write_bytes(original + b"\n")
        status = sh(repo, py, "-m", "dvc", "status", stage, env=env)
        assert re.search(
            rf"^{stage}:\n\s+changed deps:\n(\s+.*\n)*?\s+modified:\s+"
            rf"{rel.rsplit('/', 1)[0]}",
            status,
            re.M,
        ), (rel, status)
        (repo / rel).write_bytes(original)
    assert "up to date" in sh(repo, py, "-m", "dvc", "status", env=env)

    # every plot renders from local files into a page that needs no network
    sh(repo, py, str(ROOT / "scripts/offline_plots.py"), env=env)
    plots = sh(repo, py, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots"), env=env)
    assert "failed to load" not in plots, plots
    page = (tmp_path / "plots/index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page
    for plot in ("Loss", "Base_vs_tuned", "confusion"):
        assert f"vegaEmbed('#{plot}" in page or plot in page, plot

    manifest = json.loads((repo / "reports/manifest.json").read_text())
    assert {"data_md5", "tokenizer_md5", "config_sha256", "git", "seed", "packages"} <= set(
        manifest
    )
    assert manifest["data_md5"]["data/processed/test.jsonl"] == _md5(
        repo / "data/processed/test.jsonl"
    )
    card = (repo / "reports/model_card.md").read_text()
    assert f"{metrics['tuned']['test_loss']:.4f}" in card and "## Data lineage" in card

    sh(repo, "git", "add", "-A", env=env)
    sh(repo, "git", "commit", "-qm", "first run", env=env)

    # regression check: an unchanged rerun passes; defective raw rows rerun only validate
    # (the valid records are the same) and show as a data change; more training rows leave the
    # fixed test set where it was and are judged with intervals; a changed test set is not
    # comparable; a worse model fails
    regression = [py, str(ROOT / "scripts/regression.py")]
    out = sh(repo, *regression, env=env)
    assert "no regression:" in out and "data: unchanged" in out
    with (repo / "data/raw/tickets.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "cut off\n')
        f.write(json.dumps({"messages": [{"role": "customer", "content": "hi"}]}) + "\n")
    out = sh(repo, py, "-m", "dvc", "repro", env=env)
    assert "Running stage 'validate'" in out
    assert "Running stage 'base_model'" not in out and "Running stage 'train'" not in out
    out = sh(repo, *regression, env=env)
    assert "modified  data/raw" in out and "no regression:" in out
    test_before = (repo / "data/processed/test.jsonl").read_bytes()
    more = (ROOT / "data/raw/tickets.jsonl").read_text().splitlines(True)[240:300]
    with (repo / "data/raw/tickets.jsonl").open("a") as f:
        f.writelines(more)
    out = sh(repo, py, "-m", "dvc", "repro", env=env)
    assert "Running stage 'train'" in out
    assert (repo / "data/processed/test.jsonl").read_bytes() == test_before
    judged = subprocess.run(
        regression, cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    assert judged.returncode in (0, 1), judged.stdout + judged.stderr  # judged, either way
    assert "(unchanged); intervals: paired bootstrap, 95%" in judged.stdout, judged.stdout
    assert re.search(r"tuned\.test_loss .* \[[-+]\d\.\d{4}, [-+]\d\.\d{4}\]", judged.stdout)
    sh(repo, "git", "add", "-A", env=env)
    sh(repo, "git", "commit", "-qm", "more training rows", env=env)
    test_file = repo / "data/eval/tickets_test.jsonl"
    test_file.write_text("".join(test_file.read_text().splitlines(True)[1:]))  # one row less
    sh(repo, py, "-m", "dvc", "repro", env=env)
    other = subprocess.run(
        regression, cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    assert other.returncode == 2 and "NOT COMPARABLE: the test set changed" in other.stdout, (
        other.stdout + other.stderr
    )
    sh(repo, "git", "checkout", "data/eval", env=env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["learning_rate"] = 1e-9  # as good as untrained
    params["regression"]["tolerance"]["test_loss"] = 0.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, py, "-m", "dvc", "repro", env=env)
    worse = subprocess.run(
        regression, cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    assert worse.returncode == 1, worse.stdout + worse.stderr
    assert re.search(r"tuned\.test_loss .* REGRESSION", worse.stdout), worse.stdout
    assert "train.learning_rate: 0.001 -> 1e-09" in worse.stdout
    sh(repo, "git", "checkout", "params.yaml", env=env)

    sh(
        repo,
        py,
        "-m",
        "dvc",
        "exp",
        "run",
        "-n",
        "lr-2e-3",
        "-S",
        "train.learning_rate=0.002",
        env=env,
    )
    shown = _json_part(sh(repo, py, "-m", "dvc", "exp", "show", "--json", env=env))
    experiments = [exp for rev in shown for exp in (rev.get("experiments") or [])]
    named = [e for e in experiments if e.get("name") == "lr-2e-3"]
    assert named, f"experiment missing from dvc exp show: {shown}"
    data = named[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.002
    assert "exact_match" in data["metrics"]["reports/summary.json"]["data"]
    assert list(data["metrics"]) == ["reports/summary.json"]  # stage reports stay out

    # a queued sweep of two experiments: both finish, compare in `dvc exp show`, and leave
    # W&B runs grouped by experiment and tagged with the swept value
    sh(
        repo,
        py,
        "-m",
        "dvc",
        "exp",
        "run",
        "--queue",
        "-S",
        "train.learning_rate=0.001,0.003",
        env=env,
    )
    sh(repo, py, "-m", "dvc", "queue", "start", "-j", "1", env=env)
    deadline = time.time() + 600
    while True:
        status = sh(repo, py, "-m", "dvc", "queue", "status", env=env)
        if "Queued" not in status and "Running" not in status:
            break
        assert time.time() < deadline, status
        time.sleep(3)
    assert "Failed" not in status, status
    shown = _json_part(sh(repo, py, "-m", "dvc", "exp", "show", "--json", env=env))
    swept = {}
    for exp in (e for rev in shown for e in (rev.get("experiments") or [])):
        data = exp["revs"][0]["data"]
        lr = data["params"]["params.yaml"]["data"]["train"]["learning_rate"]
        if lr in (0.001, 0.003) and data.get("metrics"):
            swept[lr] = exp["name"]
    assert set(swept) == {0.001, 0.003}, shown
    # `make exps`: the swept param and the summary metrics, inside 200 columns
    recipe = ""
    for line in (ROOT / "Makefile").read_text().split("\nexps:")[1].splitlines()[1:]:
        recipe += line.strip().rstrip("\\") + " "
        if not line.endswith("\\"):
            break
    command = recipe.replace("$(BIN)/dvc", f"{py} -m dvc").replace("$$", "$").replace("$(ARGS)", "")
    table = subprocess.run(
        command,
        shell=True,
        cwd=repo,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    assert max(map(len, table.stdout.splitlines())) <= 200, table.stdout
    assert "train.learning_rate" in table.stdout and "exact_match" in table.stdout, table.stdout
    assert "0.003" in table.stdout and "train.max_steps" not in table.stdout, table.stdout
    runs = [read_offline_run(d) for d in (repo / "wandb-runs" / "wandb").glob("offline-run-*")]
    for lr, name in swept.items():
        # the report run is the experiment's row in W&B: whole config, hashes, final metrics
        [report] = [
            r
            for r in runs
            if r["config"]["dvc"]["exp_name"] == name and r["config"]["stage"] == "report"
        ]
        assert report["config"]["params"]["train"]["learning_rate"] == lr
        assert {"data", "eval", "method", "split"} <= set(report["config"]["params"])
        assert report["config"]["manifest"]["model"]["merged_md5"]
        assert report["config"]["manifest"]["lock"]["file"] == "requirements/cpu.txt"
        assert "exact_match" in report["summary"] and report["summary"]["test_set_sha256"]
        grouped = [r for r in runs if r["config"]["dvc"]["exp_name"] == name]  # the W&B group
        assert {r["config"]["stage"] for r in grouped} >= {"train", "evaluate"}, (name, runs)
        tags = next(r.get("tags", []) for r in grouped if r["config"]["stage"] == "train")
        # tagged with what the experiment changed against its baseline commit (lr 0.001)
        assert ("train.learning_rate=0.003" in tags) is (lr == 0.003), (lr, tags)

    # a `dvc repro` killed mid-training resumes from its last checkpoint when run again
    train = yaml.safe_load((repo / "conf/train/tiny.yaml").read_text())
    train.update(max_steps=40, eval_steps=4, per_device_train_batch_size=2)
    (repo / "conf/train/tiny.yaml").write_text(yaml.safe_dump(train))
    sh(repo, py, "-m", "stages.common.compose", env=env)
    repro = subprocess.Popen(
        [py, "-m", "dvc", "repro"],
        cwd=repo,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = repo / "models/checkpoints/checkpoint-8/trainer_state.json"
    deadline = time.time() + 600
    while not checkpoint.exists():
        assert repro.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.02)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    out = sh(repo, py, "-m", "dvc", "repro", env=env)
    assert "resuming from checkpoint-" in out
    report = json.loads((repo / "reports/train.json").read_text())
    assert report["resumed"] and report["resumed_from_step"] >= 8
    assert report["optimizer_steps"] == 40


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _json_part(text: str):
    return json.loads(text[text.index("[") :])


@pytest.mark.parametrize(
    "method, objective, extra",
    [
        ("qlora", "sft", []),
        ("dora", "dpo", []),
        ("full", "cpt", []),
        ("lora", "reward", []),
        # a few short GRPO steps after the SFT phase
        ("lora", "grpo", ["objective.steps=2", "objective.max_completion_length=8"]),
    ],
)
def test_method_and_objective_switch_with_one_flag_each(
    tmp_path, tiny_model_dir, method, objective, extra
):
    repo, env = committed_repo(tmp_path, tiny_model_dir, wandb_mode="disabled")
    py = sys.executable
    flags = [f"method={method}", f"objective={objective}", *extra]
    sh(repo, py, "-m", "dvc", "exp", "run", *(x for f in flags for x in ("-S", f)), env=env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["method"]["name"] == method and params["objective"]["name"] == objective
    report = json.loads((repo / "reports/train.json").read_text())
    assert (report["method"], report["objective"]) == (method, objective)
    validated = json.loads((repo / "reports/validate.json").read_text())
    kind = {"sft": "messages", "dpo": "preference", "cpt": "text", "reward": "preference"}
    assert set(validated["kinds"].values()) == {kind.get(objective, "messages")}
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    round_trip = json.loads((repo / "reports/export.json").read_text())["round_trip"]
    if objective == "reward":  # ranked pairs, not answers
        assert 0 <= metrics["tuned"]["pairwise_accuracy"] <= 1
        assert round_trip["reward_scores_match"]
        # `make reward-model` keeps it as models/reward, versioned by DVC, for GRPO
        sh(repo, py, str(ROOT / "scripts/keep_reward_model.py"), env=env)
        assert (repo / "models/reward.dvc").exists()
        assert tuned.is_reward_model(repo / "models/reward")
    else:
        assert metrics["tuned"]["test_loss"] > 0 and "perplexity" in metrics["delta"]
        assert round_trip["greedy_answers_match"]
    if objective == "grpo":
        assert report["grpo"]["steps"] == 2
        manifest = json.loads((repo / "reports/manifest.json").read_text())
        assert manifest["grpo"] == report["grpo"]
        assert "then GRPO from the SFT model" in (repo / "reports/model_card.md").read_text()
    shown = _json_part(sh(repo, py, "-m", "dvc", "exp", "show", "--json", env=env))
    runs = [e["revs"][0]["data"] for rev in shown for e in (rev.get("experiments") or [])]
    assert [r["params"]["params.yaml"]["data"]["objective"]["name"] for r in runs] == [objective]
    summary = runs[0]["metrics"]["reports/summary.json"]["data"]
    # raw text has no prompts to answer: its metric is the test loss
    metric = {"reward": "pairwise_accuracy", "cpt": "test_loss"}.get(objective, "exact_match")
    assert metric in summary


def test_a_preset_switches_with_one_flag(tmp_path, tiny_model_dir):
    # `+experiment=<preset>` through DVC's Hydra composition: the smoke preset on the model the
    # config names (here the tiny one), every stage run, the preset named in params and manifest
    repo, env = committed_repo(tmp_path, tiny_model_dir, wandb_mode="disabled")
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "+experiment=smoke", env=env)
    for name in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        assert f"Running stage '{name}'" in out
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["preset"] == "smoke" and params["eval"]["general_path"] is None
    assert json.loads((repo / "reports/train.json").read_text())["optimizer_steps"] == 4
    assert json.loads((repo / "reports/manifest.json").read_text())["preset"] == "smoke"


@pytest.mark.slow
def test_experiments_shared_across_clones(tmp_path, tiny_model_dir):
    """README's recipe "Share experiments across machines", as it is written: the project is
    pushed once (git remote and DVC remote, local folders here) with its baseline run; two
    clones each `dvc pull` it, run an experiment of their own and `dvc exp push` it; a third
    clone lists and pulls both, compares them in `dvc exp show`, applies one and judges it
    against the other with `make regression`. Their W&B runs share one project, grouped by
    experiment."""
    origin, env = committed_repo(tmp_path, tiny_model_dir, wandb_mode="offline")
    dvc = (sys.executable, "-m", "dvc")
    shared_git, shared_dvc = tmp_path / "shared.git", tmp_path / "dvc-storage"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(shared_git), env=env)
    sh(origin, *dvc, "remote", "add", "-d", "shared", str(shared_dvc), env=env)
    sh(origin, *dvc, "repro", env=env)
    sh(origin, "git", "add", "-A", env=env)
    sh(origin, "git", "commit", "-qm", "baseline run, shared remotes", env=env)
    sh(origin, *dvc, "push", env=env)
    sh(origin, "git", "remote", "add", "origin", str(shared_git), env=env)
    sh(origin, "git", "push", "-q", "origin", "main", env=env)

    experiments = {"lr-high": 0.003, "lr-low": 0.0005}
    for (exp, lr), machine in zip(experiments.items(), ("alice", "bob")):
        clone = tmp_path / machine
        sh(tmp_path, "git", "clone", "-q", str(shared_git), str(clone), env=env)
        sh(clone, *dvc, "pull", env=env)  # the baseline's outputs: the data stages are done
        out = sh(clone, *dvc, "exp", "run", "-n", exp, "-S", f"train.learning_rate={lr}", env=env)
        assert "Running stage 'train'" in out and "Running stage 'validate'" not in out, out
        sh(clone, *dvc, "exp", "push", "origin", exp, env=env)

    carol = tmp_path / "carol"
    sh(tmp_path, "git", "clone", "-q", str(shared_git), str(carol), env=env)
    listed = sh(carol, *dvc, "exp", "list", "origin", env=env)
    assert all(exp in listed for exp in experiments), listed
    sh(carol, *dvc, "exp", "pull", "origin", *experiments, env=env)
    shown = _json_part(sh(carol, *dvc, "exp", "show", "--json", env=env))
    found = {
        e["name"]: e["revs"][0]["data"]
        for rev in shown
        for e in (rev.get("experiments") or [])
        if e.get("name") in experiments
    }
    assert set(found) == set(experiments), shown
    for exp, data in found.items():
        assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == experiments[exp]
        assert "exact_match" in data["metrics"]["reports/summary.json"]["data"]
    sh(carol, *dvc, "exp", "apply", "lr-high", env=env)
    assert "learning_rate: 0.003" in (carol / "params.yaml").read_text()
    # `make regression BASELINE=lr-low` (make hands BASELINE to the script's environment)
    judged = subprocess.run(
        [sys.executable, str(ROOT / "scripts/regression.py")],
        cwd=carol,
        env={**env, "BASELINE": "lr-low"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert judged.returncode in (0, 1), judged.stdout + judged.stderr  # 2: not comparable
    assert "baseline lr-low" in judged.stdout, judged.stdout
    assert "train.learning_rate: 0.0005 -> 0.003" in judged.stdout, judged.stdout

    # each machine's W&B runs (offline, synced later) name one project and their experiment
    project = yaml.safe_load((carol / "params.yaml").read_text())["tracking"]["project"]
    for (exp, _), machine in zip(experiments.items(), ("alice", "bob")):
        runs = [
            read_offline_run(d)
            for d in (tmp_path / machine / "wandb-runs" / "wandb").glob("offline-run-*")
        ]
        report = [r for r in runs if r["config"]["stage"] == "report"]
        assert report and report[-1]["config"]["dvc"]["exp_name"] == exp, runs
        assert {r["project"] for r in runs} == {project}, runs
