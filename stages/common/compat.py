"""Every use of another library's private API, in one place. tests/test_compat.py fails
loudly, naming the library, when an upgrade renames or reshapes one of them.

- `trl.trainer.utils._use_triton(device)` (TRL 1.16): the devices on which TRL's fused loss
  projects only the labelled positions through the LM head.
- `transformers.Trainer._prepare_inputs(batch)`: moves a collated batch where the training
  step would (device, dtype), for train's pre-flight measurement.
- scripts/serve.py overrides `_resolve_model(body)` of transformers serve's request handlers
  (it returns `(name, model, processor)`) to answer with the one preloaded model.
"""

from __future__ import annotations


def score_only_answer_tokens() -> None:
    """Make TRL's fused loss project only label positions through the LM head on CPU.

    TRL 1.16 skips the masked (prompt) positions only on Triton devices, to keep tile shapes
    stable for compilers; on CPU it scores every position and then throws most away. Our
    prompts are ~90% of each row, so this halves a CPU step (8.9 -> 4.0 s, same losses to
    the last digit). `trl.trainer.utils` imported the check by name, so we rebind it there.
    """
    import trl.trainer.utils as trl_utils

    if hasattr(trl_utils, "_use_triton"):
        trl_utils._use_triton = lambda device: True


def prepare_inputs(trainer, batch: dict) -> dict:
    """A collated batch on the trainer's device, as its training step sees it."""
    return trainer._prepare_inputs(batch)
