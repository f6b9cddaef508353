"""reports/index.html: one run on one page, for people (the report stage writes it).

Self-contained: inline CSS, the loss curves as inline SVG, a few lines of inline JavaScript for
the predictions filter; nothing is fetched, so it opens from file:// and from an archived run.
The template (report_page.html.jinja, Jinja2 with autoescaping, so no text from the data can
inject markup) lays out the sections; this module turns the reports into what it shows.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

TEMPLATE = Path(__file__).with_name("report_page.html.jinja")
MAX_PREDICTIONS = 2000  # rows in the page's table; every prediction stays in predictions.jsonl
EXAMPLES_PER_REASON = 3  # quarantined rows shown per reason code
SECTIONS = (  # in page order; augment and the last four appear when the run has them
    "results",
    "training",
    "validation",
    "dedup",
    "split",
    "augment",
    "confusion",
    "predictions",
    "forgetting",
    "safety",
    "lineage",
)
COLORS = ("#2f6fde", "#e0731f")


def number(value) -> str:
    """A figure as the page shows it: integers whole, other numbers to 4 decimals."""
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.4f}"
    return str(value)


def read_curve(path: Path) -> list[tuple[float, float]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["loss"]]


def curves(series: dict[str, list[tuple[float, float]]], width: int = 640, height: int = 240):
    """Polylines of loss against step, on shared axes, as SVG coordinates."""
    left, top, right, bottom = 44, 8, 8, 22
    points = [p for line in series.values() for p in line]
    plot_width, plot_height = width - left - right, height - top - bottom
    out = {"width": width, "height": height, "left": left, "top": top, "lines": []}
    out |= {"plot_width": plot_width, "plot_height": plot_height, "x_ticks": [], "y_ticks": []}
    if not points:
        return out
    x_max = max(x for x, _ in points) or 1.0
    y_max = max(y for _, y in points) or 1.0

    def xy(x: float, y: float) -> str:
        return f"{left + x / x_max * plot_width:.1f},{top + (1 - y / y_max) * plot_height:.1f}"

    for (name, line), color in zip(series.items(), COLORS):
        if line:
            out["lines"].append(
                {
                    "name": name,
                    "color": color,
                    "n": len(line),
                    "points": " ".join(xy(x, y) for x, y in line),
                }
            )
    out["y_ticks"] = [
        {"y": top + (1 - f) * plot_height, "label": f"{f * y_max:.2f}"} for f in (0, 0.5, 1)
    ]
    out["x_ticks"] = [
        {"x": left + f * plot_width, "label": f"{f * x_max:.0f}"} for f in (0, 0.5, 1)
    ]
    return out


def confusion_tables(folder: Path) -> list[dict]:
    """Each reports/plots/confusion/<model>_<field>.csv as a table of counts."""
    tables = []
    for path in sorted(folder.glob("*.csv")) if folder.exists() else []:
        model, field = path.stem.split("_", 1)
        with path.open(encoding="utf-8") as f:
            pairs = Counter((r["actual"], r["predicted"]) for r in csv.DictReader(f))
        labels = sorted({a for a, _ in pairs})
        columns = labels + sorted({p for _, p in pairs} - set(labels))
        tables.append(
            {
                "model": model,
                "field": field,
                "columns": columns,
                "rows": [{"label": a, "counts": [pairs[(a, c)] for c in columns]} for a in labels],
            }
        )
    return tables


def jsonl_rows(path: Path):
    """The rows of a JSONL file, one at a time."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def quarantine_examples(quarantined) -> dict[str, list[dict]]:
    """A few quarantined rows per reason: where they are and what they hold (cut short)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for q in quarantined:
        for reason in q["reasons"]:
            if len(out[reason]) < EXAMPLES_PER_REASON:
                record = q.get("record") or q.get("raw") or ""
                text = str(record)[:240] if not isinstance(record, dict) else last_turn(record)
                out[reason].append({"where": f"{q['source']}:{q['line']}", "text": text})
    return dict(out)


def last_turn(record: dict) -> str:
    """The request of a quarantined record (its last user turn), else the record, cut short."""
    turns = record.get("messages") or record.get("prompt") or []
    if isinstance(turns, list):
        said = [t for t in turns if isinstance(t, dict) and t.get("role") == "user"]
        if said:
            return str(said[-1].get("content"))[:240]
    return str(record)[:240]


def prediction_rows(predictions: list[dict], per_example: list[str]) -> tuple[str, list[dict]]:
    """The table's rows, with the one per-example score that says right or wrong."""
    metric = next(
        (
            m
            for m in ("exact_match", "pairwise_accuracy", *per_example)
            if m != "test_loss" and any(m in p["scores"]["tuned"] for p in predictions)
        ),
        None,
    )
    rows = []
    for p in predictions[:MAX_PREDICTIONS]:
        score = p["scores"]["tuned"].get(metric) if metric else None
        rows.append(
            {k: p[k] for k in ("input", "reference", "base", "tuned")}
            | {"score": score, "right": bool(score is not None and score >= 1)}
        )
    return metric or "score", rows


def render(reports: dict, manifest: dict, files: dict) -> str:
    """The page's HTML from the stage reports, the manifest and the files it shows rows of
    (`files`: quarantined, predictions, the curves and the confusion folder)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["num"] = number
    metrics, split = reports["metrics"], reports["split"]
    right_metric, predictions = prediction_rows(files["predictions"], metrics["per_example"])
    confusion = confusion_tables(files["confusion"])
    shown = [
        k
        for k in SECTIONS
        if (k != "confusion" or confusion)
        and (k != "augment" or reports["augment"]["enabled"])
        and (k != "forgetting" or "forgetting" in metrics)
        and (k != "safety" or "safety" in metrics)
    ]
    return env.get_template(TEMPLATE.name).render(
        title=f"{manifest['model']['name_or_path']}: {manifest['method']} / "
        f"{manifest['objective']}",
        sections=shown,
        manifest=manifest,
        metrics=metrics | {k: metrics.get(k) for k in ("forgetting", "safety")},
        train=reports["train"],
        validate=reports["validate"],
        review=reports["validate"].get("review"),
        dedup=reports["dedup"],
        split=split,
        augment=reports["augment"],
        balance_rows=sorted({s for counts in split["class_balance"].values() for s in counts}),
        quarantine_examples=quarantine_examples(files["quarantined"]),
        curves=curves({"train": files["train_curve"], "validation": files["eval_curve"]}),
        confusion=confusion,
        right_metric=right_metric,
        predictions=predictions,
        predictions_left_out=max(0, len(files["predictions"]) - MAX_PREDICTIONS),
    )
