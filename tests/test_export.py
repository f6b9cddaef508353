"""export: models/merged is a plain Hugging Face folder that answers exactly as base + adapter,
with the prompt tokens training used; a merged model that answers otherwise fails loudly."""

from __future__ import annotations

import json

import pytest
from conftest import set_params, switch_method

from stages import export, train
from stages.common.config import StageError
from stages.common.files import read_jsonl, write_jsonl


@pytest.fixture
def trained(prepared):
    set_params(prepared, **{"export.check_examples": 4, "export.max_new_tokens": 12})
    train.main()
    write_jsonl(
        prepared / "data/processed/test.jsonl",
        read_jsonl(prepared / "data/processed/validation.jsonl"),
    )
    return prepared


def test_merged_folder_round_trips(trained):
    export.main()
    merged = trained / "models/merged"
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()
    assert not (merged / "adapter_config.json").exists()  # merged, not an adapter
    report = json.loads((trained / "reports/export.json").read_text())
    assert report["merged_from"] == "base + adapter"
    assert report["round_trip"] == {
        **report["round_trip"],
        "examples": 4,
        "prompt_tokens_match": True,
        "greedy_answers_match": True,
    }


def test_a_merge_that_answers_otherwise_fails(trained, monkeypatch):
    # a merge that silently drops the adapter is the bug the round trip exists to catch
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kwargs: self.unload())
    # make the adapter matter: scale it up so the base alone answers differently
    set_params(trained, **{"train.learning_rate": 0.05, "train.max_steps": 8})
    train.main()
    with pytest.raises(StageError, match=r"round trip: .*line \d+.*merged model answers"):
        export.main()


def test_full_fine_tune_exports_as_is(trained):
    switch_method(trained, "full", **{"train.max_steps": 2})
    train.main()
    export.main()
    report = json.loads((trained / "reports/export.json").read_text())
    assert report["merged_from"] == "full fine-tune"
    assert report["round_trip"]["greedy_answers_match"]


def test_first_difference():
    from stages import export

    assert export.first_difference([[1, 2], [3]], [[1, 2], [3]]) is None
    assert export.first_difference([[1, 2], [3], [4]], [[1, 2], [5], [6]]) == 1


@pytest.mark.parametrize("method", ["ia3", "prefix", "prompt"])
def test_other_adapters_merge_or_stay_beside_the_base(trained, method):
    """IA3 folds into the weights like LoRA; prefix and prompt tuning cannot, so models/merged
    keeps the base's weights with the adapter beside them, and the round trip still holds."""
    from stages.common import tuned

    switch_method(trained, method, **{"train.max_steps": 2})
    train.main()
    export.main()
    merged = trained / "models/merged"
    report = json.loads((trained / "reports/export.json").read_text())
    assert report["round_trip"]["greedy_answers_match"]
    adapter = merged / tuned.ADAPTER_DIR / "adapter_config.json"
    if method == "ia3":
        assert report["merged_from"] == "base + adapter" and not adapter.exists()
    else:
        assert report["merged_from"].startswith(f"not merged: {method} tuning")
        assert adapter.exists() and (merged / "model.safetensors").exists()


@pytest.fixture
def reward_trained(prepared):
    """A reward model trained on the toy preference pairs, and its validation pairs as test."""
    from helpers import write_preference_splits

    write_preference_splits(prepared)
    set_params(
        prepared,
        **{"objective": {"name": "reward"}, "train.max_steps": 20, "export.check_examples": 4},
    )
    train.main()
    write_jsonl(
        prepared / "data/processed/test.jsonl",
        read_jsonl(prepared / "data/processed/validation.jsonl"),
    )
    return prepared


def test_reward_model_exports_with_its_score_head(reward_trained, monkeypatch):
    """objective=reward: models/merged is a sequence-classification model that scores each
    test pair as base + adapter did; a merge that drops the adapter fails, naming the pair."""
    export.main()
    config = json.loads((reward_trained / "models/merged/config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert len(config["id2label"]) == 1 and config["pad_token_id"] is not None
    round_trip = json.loads((reward_trained / "reports/export.json").read_text())["round_trip"]
    assert round_trip["examples"] == 4 and round_trip["reward_scores_match"]
    assert round_trip["unchanged_by_rounding"] == 8  # both sides of 4 pairs

    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kwargs: self.unload())
    with pytest.raises(StageError, match=r"round trip: .*line 1 .*merged model scores"):
        export.main()
