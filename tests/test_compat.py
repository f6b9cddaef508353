"""compat: the private APIs of other libraries the project relies on still exist in the shape
it uses them (stages/common/compat.py lists them). A library upgrade that changes one fails
here, naming it, instead of deep inside a stage or, worse, silently."""

from __future__ import annotations

import inspect

import pytest

from stages.common import compat


def test_trl_fused_loss_still_asks_use_triton_and_the_rebinding_takes():
    import torch
    import trl.trainer.utils as trl_utils

    assert callable(getattr(trl_utils, "_use_triton", None)), (
        "TRL no longer has trl.trainer.utils._use_triton: see compat.score_only_answer_tokens"
    )
    assert "_use_triton(hidden_states.device)" in inspect.getsource(trl_utils), (
        "TRL's fused loss no longer decides by _use_triton(hidden_states.device)"
    )
    from trl.kernels.chunked_logprob import _use_triton as trl_decides

    assert trl_decides(torch.device("cpu")) is False  # what TRL does on CPU by itself
    bound = trl_utils._use_triton  # an earlier train run in this process may have rebound it
    try:
        trl_utils._use_triton = trl_decides
        compat.score_only_answer_tokens()
        assert trl_utils._use_triton(torch.device("cpu")) is True
    finally:
        trl_utils._use_triton = bound


def test_trainer_prepare_inputs_takes_a_batch():
    from transformers import Trainer

    assert list(inspect.signature(Trainer._prepare_inputs).parameters) == ["self", "inputs"], (
        "transformers changed Trainer._prepare_inputs: see compat.prepare_inputs"
    )


@pytest.mark.parametrize(
    "module, name",
    [
        ("chat_completion", "ChatCompletionHandler"),
        ("completion", "CompletionHandler"),
        ("response", "ResponseHandler"),
    ],
)
def test_serve_handlers_resolve_the_model_the_way_serve_overrides_it(module, name):
    import importlib

    handler = getattr(importlib.import_module(f"transformers.cli.serving.{module}"), name)
    signature = inspect.signature(handler._resolve_model)
    assert list(signature.parameters) == ["self", "body"], (
        f"transformers changed {name}._resolve_model: see pinned() in scripts/serve.py"
    )
    assert str(signature.return_annotation).startswith("tuple[str,")
