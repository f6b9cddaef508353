"""The training chat template: the model's own template with `{% generation %}` markers, proven
to put loss on exactly the tokens the model generates.

transformers turns the markers into the assistant mask that decides which tokens carry loss
(stages/common/examples.py). Most models ship a template without them. `choose()` picks one,
accepting a candidate only when `verify()` finds no problem on the probe conversations:

1. `model.training_chat_template` (a path), when set: the user's explicit choice, the only one;
2. the shipped template, when it already has markers;
3. TRL's training template for the shipped one (`trl.chat_template_utils`);
4. `derive()`: the shipped template itself, wrapped so that it marks each assistant turn;
otherwise a one-line error naming the model family and `model.training_chat_template`.

What "the tokens the model generates" are: at inference the model is given the conversation up
to a turn plus the generation prompt, and generates until a stop token (the tokenizer's EOS or
any of generation_config's `eos_token_id`). So an assistant turn trains on what the shipped
template renders after `render(earlier turns, add_generation_prompt=True)`, up to and including
the first stop token, and on nothing else: not the role header that the generation prompt
already holds, not the newline some templates write after the stop token. `inference_spans()`
computes this by rendering; it is defined when the template is prefix-preserving (rendering
the prompt of a turn gives the start of the whole conversation's text).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from stages.common.config import StageError

# Conversations on which a training template must render what the shipped one renders, and mark
# exactly the generated tokens: one turn, several turns with and without a system prompt, a
# prompt alone. A probe the model's own template refuses (Gemma 2 has no system role) is skipped.
PROBES = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Order #123 is late."},
        {"role": "assistant", "content": '{"urgency": "high"}'},
        {"role": "user", "content": "Any update?\nStill waiting."},
        {"role": "assistant", "content": "Checking now."},
    ],
    [
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": "On its way."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
    [{"role": "user", "content": "Q"}],
]

_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_END_MARKER = re.compile(r"\{%-?\s*endgeneration\s*-?%\}")

# The derived training template. The shipped template becomes a macro; each assistant turn is
# found by rendering the turns before it with the generation prompt (its text must start the
# whole conversation's text, else the template raises), and ends after the first stop token.
_DERIVED = """\
{#- Training chat template derived by stages/base_model.py from the model's own template (the
    macro below, unchanged). It renders exactly what that template renders and wraps in
    {% generation %} what the model generates after the generation prompt, up to and including
    the first stop token: those tokens, and only those, carry loss. -#}
{%- macro shipped_chat(messages, add_generation_prompt) %}@SHIPPED@{% endmacro %}
{%- set stops = @STOPS@ %}
{%- set rendered = shipped_chat(messages, add_generation_prompt) %}
{%- set written = namespace(upto=0) %}
{%- for message in messages %}
  {%- if message['role'] == 'assistant' and loop.index0 > 0 %}
    {%- set prompt = shipped_chat(messages[:loop.index0], true) %}
    {%- set start = prompt | length %}
    {%- if start < written.upto %}
      {{- raise_exception('assistant message ' ~ loop.index0 ~ ' begins inside the answer before '
            ~ 'it: no stop token (' ~ stops | join(' ') ~ ') ends that answer') }}
    {%- endif %}
    {%- if rendered[:start] != prompt %}
      {{- raise_exception('chat template is not prefix-preserving at message ' ~ loop.index0
            ~ ': the conversation up to it renders differently once more turns follow') }}
    {%- endif %}
    {%- set turn = namespace(end=-1) %}
    {%- for stop in stops %}
      {%- set at = rendered.find(stop, start) %}
      {%- if at >= 0 and (turn.end < 0 or at + stop | length < turn.end) %}
        {%- set turn.end = at + stop | length %}
      {%- endif %}
    {%- endfor %}
    {%- if turn.end < 0 %}
      {{- raise_exception('assistant message ' ~ loop.index0 ~ ' is not followed by any stop '
            ~ 'token (' ~ stops | join(' ') ~ '): the model would never learn to stop') }}
    {%- endif %}
    {{- rendered[written.upto:start] }}
    {%- generation %}{{ rendered[start:turn.end] }}{% endgeneration %}
    {%- set written.upto = turn.end %}
  {%- endif %}
{%- endfor %}
{{- rendered[written.upto:] }}"""


def has_markers(template: str) -> bool:
    return _MARKER.search(template) is not None


def stop_tokens(tokenizer, eos_token_ids) -> list[str]:
    """The tokens generation stops at: the tokenizer's EOS and generation_config's eos ids."""
    ids = eos_token_ids if isinstance(eos_token_ids, list) else [eos_token_ids]
    ids = [i for i in ids if i is not None]
    tokens = [tokenizer.eos_token, *tokenizer.convert_ids_to_tokens(ids)]
    return list(dict.fromkeys(t for t in tokens if t))


def derive(shipped: str, stops: list[str]) -> str:
    # markers the shipped template may carry would be counted inside the macro: neutralise them
    unmarked = _MARKER.sub(lambda m: m.group(0).replace("generation", "if true"), shipped)
    unmarked = _END_MARKER.sub(lambda m: m.group(0).replace("endgeneration", "endif"), unmarked)
    return _DERIVED.replace("@STOPS@", json.dumps(stops)).replace("@SHIPPED@", unmarked)


def trl_template(tokenizer) -> tuple[str, str] | None:
    """(TRL's training template for the tokenizer's template, its file name), or None."""
    import trl
    from trl.chat_template_utils import get_training_chat_template

    try:
        template = get_training_chat_template(tokenizer)
    except Exception:  # noqa: BLE001  (TRL does not know it, or its tool-call probe fails on it)
        return None
    if template is None:  # TRL finds it training-ready as it is: the shipped candidate covers it
        return None
    folder = Path(trl.__file__).parent / "chat_templates"
    name = next(
        (
            p.name
            for p in sorted(folder.glob("*_training.jinja"))
            if p.read_text(encoding="utf-8") == template
        ),
        "trl",
    )
    return template, name


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def inference_spans(
    tokenizer, shipped: str, messages: list[dict], stops: list[str]
) -> list[tuple[int, int]] | str:
    """Character spans of what the model generates for each assistant turn (see the module
    docstring), or a sentence saying why there are none."""
    from jinja2 import TemplateError

    rendered = _render(tokenizer, shipped, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        try:
            prompt = _render(tokenizer, shipped, messages[:i], True)
        except TemplateError as err:
            return f"unable to render the prompt of message {i} ({str(err).splitlines()[0]})"
        if not rendered.startswith(prompt):
            return (
                f"not prefix-preserving: message {i} follows another text than its prompt "
                f"{prompt[-40:]!r}"
            )
        if spans and len(prompt) < spans[-1][1]:
            return f"the answer before message {i} runs into it: no stop token {stops} ends it"
        ends = [at + len(stop) for stop in stops if (at := rendered.find(stop, len(prompt))) >= 0]
        if not ends:
            return f"assistant message {i} is not followed by any stop token {stops}"
        span = (len(prompt), min(ends))
        if message["content"].strip() not in rendered[span[0] : span[1]]:
            return f"assistant message {i} is not where its turn is rendered"
        spans.append(span)
    return spans


def _token_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _expected_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Token mask of character spans, the way transformers maps generation markers to tokens."""
    encoding = tokenizer(text, add_special_tokens=False)
    mask = [0] * len(encoding["input_ids"])
    for start, end in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None:
            continue
        for k in range(first, (last if last is not None else len(mask) - 1) + 1):
            mask[k] = 1
    return mask


def verify(
    tokenizer, shipped: str, training: str, stops: list[str], strict: bool = True
) -> tuple[list[str], bool]:
    """(problems, exact) of a training template on the probes: it must render what the shipped
    template renders, and its loss spans must be the inference spans (`exact`). Where those are
    undefined (a template that is not prefix-preserving) a strict check fails; otherwise weaker
    checks run: each answer inside its own span, each span ending in a stop token."""
    from jinja2 import TemplateError

    problems, exact, checked = [], True, 0
    for n, messages in enumerate(PROBES):
        prompt_only = messages[-1]["role"] != "assistant"
        try:
            a = _render(tokenizer, shipped, messages, prompt_only)
        except TemplateError:  # a conversation the model itself refuses (no system role, ...)
            continue
        try:
            b = _render(tokenizer, training, messages, prompt_only)
        except TemplateError as err:
            problems.append(f"probe {n}: does not render ({str(err).splitlines()[0]})")
            continue
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            problems.append(
                f"probe {n}: renders {b[at : at + 30]!r} where the model's template "
                f"renders {a[at : at + 30]!r}"
            )
            continue
        if prompt_only:
            continue
        checked += 1
        encoded = tokenizer.apply_chat_template(
            messages, chat_template=training, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        trained = [tokenizer.decode(run) for run in _token_runs(ids, mask)]
        spans = inference_spans(tokenizer, shipped, messages, stops)
        if isinstance(spans, str):
            exact = False
            if strict:
                problems.append(
                    f"probe {n}: which tokens the model generates cannot be "
                    f"checked: the template is {spans}"
                )
                continue
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            if len(trained) != len(answers) or any(
                answer.strip() not in text or not text.endswith(tuple(stops))
                for answer, text in zip(answers, trained)
            ):
                problems.append(
                    f"probe {n}: trains {trained}, not each answer through a stop token {stops}"
                )
            continue
        expected_mask = _expected_mask(tokenizer, a, spans)
        if mask != expected_mask:
            expected = [tokenizer.decode(run) for run in _token_runs(ids, expected_mask)]
            problems.append(f"probe {n}: trains {trained}; the model generates {expected}")
    if not checked:
        problems.append("the model's own template renders none of the probe conversations")
    return problems, exact


def choose(
    tokenizer, shipped: str, configured: str | None, stops: list[str], family: str
) -> tuple[str, dict]:
    """The training template and a report of how it was chosen (see the module docstring)."""
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise StageError(f"model.training_chat_template={configured}: file not found")
        candidates = [
            (f"model.training_chat_template ({configured})", path.read_text(encoding="utf-8"))
        ]
    else:
        candidates = []
        if has_markers(shipped):
            candidates.append(("shipped", shipped))
        from_trl = trl_template(tokenizer)
        if from_trl:
            candidates.append((f"trl ({from_trl[1]})", from_trl[0]))
        candidates.append(("derived", derive(shipped, stops)))

    rejected = {}
    for source, template in candidates:
        if not has_markers(template):
            rejected[source] = "has no {% generation %} markers"
            continue
        # an automatic choice must be provably right; the user's own file is trusted further
        problems, exact = verify(tokenizer, shipped, template, stops, strict=not configured)
        if not problems:
            return template, {
                "source": source,
                "exact_check": exact,
                "probes": len(PROBES),
                "stop_tokens": stops,
                "rejected": rejected,
            }
        rejected[source] = problems[0]
    reasons = "; ".join(f"{source}: {why}" for source, why in rejected.items())
    raise StageError(
        f"model family '{family}': no training chat template puts loss on exactly the answers "
        f"({reasons}); write one with {{% generation %}} markers around each assistant answer "
        f"and its stop token, and set model.training_chat_template to its path"
    )
