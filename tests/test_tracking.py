"""tracking: a stage leaves a finished offline W&B run whose config holds its input md5."""

from __future__ import annotations

import json

import pytest
from conftest import set_params
from helpers import labelled_rows as rows
from helpers import read_offline_run

from stages import split
from stages.common.files import md5_file, write_jsonl


@pytest.fixture
def project(project):
    """The split run's counts below are the task rows': replay (on by default) off."""
    set_params(project, **{"data.replay.fraction": 0})
    return project


def test_offline_run_has_config_md5_and_summary(project, monkeypatch, tmp_path):
    import wandb

    wandb.teardown()  # earlier tests ran wandb disabled; its settings singleton reads env once
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-that-must-not-leak-0123456789")
    write_jsonl(project / "data/interim/dedup.jsonl", rows(40))
    split.main()

    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    run = read_offline_run(run_dirs[0])
    assert run["state"] == "finished" and run["exit_code"] == 0
    assert run["name"] == "exp-test-split"
    config = run["config"]
    assert config["stage"] == "split"
    assert config["data_md5"]["dedup"] == md5_file(project / "data/interim/dedup.jsonl")
    assert config["params"]["split"]["train"] == 0.8
    assert config["dvc"]["exp_name"] == "exp-test"
    assert run["summary"]["split/train"] == 32
    # the API key never lands in the run's files
    for path in run_dirs[0].rglob("*"):
        if path.is_file():
            assert b"secret-key-that-must-not-leak" not in path.read_bytes(), path


def _params() -> dict:
    from stages.common.config import load_params

    return load_params()


def test_wandb_failing_to_start_stops_the_stage_before_any_work(project, monkeypatch):
    import wandb

    from stages.common import tracking
    from stages.common.config import StageError

    def broken_init(**_):
        raise ConnectionError("api.wandb.ai unreachable\nlong traceback text")

    monkeypatch.setattr(wandb, "init", broken_init)
    worked = []
    with pytest.raises(StageError) as err, tracking.stage_run("split", _params(), ["split"], {}):
        worked.append(True)
    assert not worked
    assert "W&B could not start the split run" in str(err.value)
    assert "ConnectionError: api.wandb.ai unreachable" in str(err.value)
    assert "tracking.mode=disabled" in str(err.value) and "\n" not in str(err.value)


def test_wandb_failing_after_the_work_is_written_down_not_fatal(project, capsys):
    import wandb

    from stages.common import tracking

    with tracking.stage_run("split", _params(), ["split"], {}):
        (project / "done.json").write_text("{}")  # the stage's work, finished
        wandb.Artifact("a name W&B refuses: /", type="model")  # raises inside wandb
    assert (project / "done.json").exists()
    failures = (project / "wandb-runs/failures.jsonl").read_text().splitlines()
    assert len(failures) == 1 and json.loads(failures[0])["stage"] == "split"
    assert "W&B failed while logging" in capsys.readouterr().err
    # a failure of the stage's own work still fails the stage
    with pytest.raises(ZeroDivisionError), tracking.stage_run("split", _params(), ["split"], {}):
        1 / 0  # noqa: B018


def test_an_environment_override_of_the_mode_is_reported(project, monkeypatch, capsys):
    from stages.common import tracking

    params = _params()
    assert params["tracking"]["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.mode_in_effect(params) == {
        "configured": "offline",
        "effective": "disabled",
        "from_environment": True,
    }
    with tracking.stage_run("split", params, ["split"], {}) as run:
        assert run.config["tracking_mode"]["from_environment"] is True
    assert (
        "WANDB_MODE=disabled from the environment overrides tracking.mode=offline"
        in capsys.readouterr().err
    )
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.mode_in_effect(params)["from_environment"] is False


def test_offline_runs_live_where_no_import_mistakes_them_for_the_package():
    from stages.common.tracking import RUNS_DIR

    assert not RUNS_DIR.isidentifier()  # `import wandb-runs` is not Python
