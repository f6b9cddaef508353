"""The Great Expectations suite of stage validate: one expectation per rule over the table of
per-row facts, each paired with the reason code its failing rows get, and the Data Docs that
show the run (made byte-reproducible: the same data gives the same pages, a DVC output)."""

from __future__ import annotations

import re
from pathlib import Path

from stages.common.files import atomic_dir
from stages.common.kinds import SHAPE
from stages.common.task import Task


def build_rules(task: Task, max_length: int | None, length_policy: str, shape: str):
    """The expectations of one record shape (chat, preference, text), each paired with the
    reason code its failing rows get."""
    import great_expectations.expectations as gxe

    rules = [
        (gxe.ExpectColumnValuesToBeNull(column="structure_error"), None),  # reason = the value
        (
            gxe.ExpectColumnValuesToBeInSet(column="empty_content", value_set=[False]),
            "empty_content",
        ),
        (
            gxe.ExpectColumnValuesToBeInSet(column="control_chars", value_set=[False]),
            "control_chars",
        ),
        (
            gxe.ExpectColumnValuesToBeInSet(column="replacement_char", value_set=[False]),
            "replacement_char",
        ),
        (gxe.ExpectColumnValuesToBeNull(column="special_token"), "special_token_leak"),
    ]
    if shape == "text":  # raw text is packed into windows: no turns, no answer, no length limit
        return rules
    rules += [
        (gxe.ExpectColumnValuesToBeNull(column="unknown_role"), "unknown_role"),
        (gxe.ExpectColumnValuesToBeNull(column="role_order"), "bad_role_order"),
        (gxe.ExpectColumnValuesToBeBetween(column="n_assistant", min_value=1), "no_assistant"),
        (
            gxe.ExpectColumnValuesToBeInSet(column="empty_answer", value_set=[False]),
            "empty_assistant",
        ),
        (gxe.ExpectColumnValuesToBeNull(column="template_error"), "template_error"),
        (
            gxe.ExpectColumnValuesToBeBetween(column="trainable_tokens", min_value=1),
            "zero_trainable_tokens",
        ),
    ]
    if shape == "preference":
        rules.append(
            (
                gxe.ExpectColumnValuesToBeInSet(column="chosen_equals_rejected", value_set=[False]),
                "chosen_equals_rejected",
            )
        )
    if length_policy != "truncate" and max_length:
        rules.append(
            (gxe.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=max_length), "too_long")
        )
    if task.answer_regex:
        # GX searches (pandas str.contains); anchor it so the whole answer must match, as
        # the metrics demand. Named groups become non-capturing: GX only needs yes/no.
        whole = r"^\s*(?:" + re.sub(r"\(\?P<\w+>", "(?:", task.answer_regex) + r")\s*$"
        rules.append(
            (gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=whole), "answer_format")
        )
    for name, allowed in task.labels.items():
        rules.append(
            (
                gxe.ExpectColumnValuesToBeInSet(column=f"label_{name}", value_set=allowed),
                "label_outside_set",
            )
        )
    return rules


def run_suite(
    frame, rules, suite_name: str, docs_dir: Path | None
) -> tuple[dict[int, list[str]], dict]:
    """Row index -> reason codes, plus a per-expectation summary; Data Docs when asked."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("raw")
        .add_dataframe_asset("records")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(
        gx.ExpectationSuite(name=suite_name, expectations=[e for e, _ in rules])
    )
    # results come back in another order: match them to rules by the expectation's id
    reasons = {e.id: reason for e, reason in zip(suite.expectations, (r for _, r in rules))}
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
    )
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="local",
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["local"]))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "partial_unexpected_count": 10},
        )
    )
    # a fixed run id keeps the Data Docs file names the same from run to run
    run_id = RunIdentifier(run_name="validate", run_time="2000-01-01T00:00:00Z")
    outcome = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
    result = next(iter(outcome.run_results.values()))

    failures: dict[int, list[str]] = {}
    summary = {}
    for res in result.results:
        cfg = res.expectation_config
        indexes = res.result.get("unexpected_index_list") or []
        name = f"{cfg.type}({cfg.kwargs.get('column')})"
        summary[name] = {
            "reason": reasons[cfg.id] or "structural (per row)",
            "success": bool(res.success),
            "unexpected": len(indexes),
        }
        for index in indexes:
            index = int(index["index"] if isinstance(index, dict) else index)
            reason = reasons[cfg.id] or frame.at[index, "structure_error"]
            failures.setdefault(index, [])
            if reason not in failures[index]:
                failures[index].append(reason)
    return failures, summary


OFFLINE_STYLE = """<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}</style>"""


# what makes GX's pages differ from run to run: timestamps (on asset URLs, the batch's load
# time; the run's own is fixed in run_suite) and random element ids
CACHE_BUSTER = re.compile(r"\?d=\d{8}T\d{6}\.\d+Z")
LOAD_TIME = re.compile(r"(?!20000101T000000\.000000Z)\d{8}T\d{6}\.\d+Z")
RANDOM_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def style_data_docs(docs_dir: Path) -> None:
    """Data Docs load their CSS from CDNs; a small inline stylesheet keeps tables readable
    offline (the CDN styles still win when online). Timestamps and random ids become stable,
    so the same data gives the same pages, byte for byte (a DVC output)."""
    for page in docs_dir.rglob("*.html"):
        html = LOAD_TIME.sub("not kept", CACHE_BUSTER.sub("", page.read_text(encoding="utf-8")))
        ids: dict[str, str] = {}
        html = RANDOM_ID.sub(lambda m: ids.setdefault(m[0], f"id-{len(ids)}"), html)
        if OFFLINE_STYLE not in html:
            html = html.replace("<head>", "<head>" + OFFLINE_STYLE, 1)
        page.write_text(html, encoding="utf-8")


def check_rows(
    frame, task: Task, max_length: int | None, length_policy: str, kind: str, docs_dir: Path
) -> tuple[dict[int, list[str]], dict]:
    """Run the suite of `kind`'s record shape over `frame` (one row of facts per raw row) and
    write its Data Docs to `docs_dir` whole (a killed run leaves the old pages, not half)."""
    rules = build_rules(task, max_length, length_policy, SHAPE.get(kind, "chat"))
    with atomic_dir(docs_dir) as docs:
        failures, summary = run_suite(frame, rules, f"{kind}_records", docs)
        style_data_docs(docs)
    return failures, summary
