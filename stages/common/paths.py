"""Every file and folder the stages hand to each other, named once.

dvc.yaml declares the same paths as the stages' deps and outs (tests/test_config.py checks
that every path here is declared there); the inputs a param names (data/raw, data/eval,
data/general, conf/...) live in conf/ instead. Stages import these names; nothing else in
stages/ spells a path of the pipeline.
"""

from pathlib import Path

# --- models ---------------------------------------------------------------------------------
BASE = Path("models/base")  # base model, tokenizer, both chat templates (base_model)
TRAINING_TEMPLATE = BASE / "chat_template_training.jinja"  # decides which tokens train
TUNED = Path("models/tuned")  # the adapter, or the fully fine-tuned model (train)
CHECKPOINTS = Path("models/checkpoints")  # kept across a killed run (train)
RUN_FILE = CHECKPOINTS / "run.json"  # which run the checkpoints belong to, and whether it ended
MERGED = Path("models/merged")  # base + adapter: what evaluate scores, serve serves (export)

# --- data -----------------------------------------------------------------------------------
VALID = Path("data/interim/valid.jsonl")  # canonical records that passed (validate)
QUARANTINE = Path("data/interim/quarantine.jsonl")  # refused rows, with reasons (validate)
MAX_LENGTH = Path("data/interim/max_length.json")  # the token budget of train (validate)
DEDUP = Path("data/interim/dedup.jsonl")  # records without duplicates (dedup)
DEDUP_REMOVED = Path("data/interim/dedup_removed.jsonl")  # each duplicate removed, and why
SPLIT_REMOVED = Path("data/interim/split_removed.jsonl")  # rows dropped for leakage
PROCESSED = Path("data/processed")  # the splits (split)
TRAIN = PROCESSED / "train.jsonl"
VALIDATION = PROCESSED / "validation.jsonl"
TEST = PROCESSED / "test.jsonl"
AUGMENTED = Path("data/augmented")  # paraphrases for rare strata (augment)
SYNTHETIC = AUGMENTED / "synthetic.jsonl"  # kept: train reads them beside TRAIN
SYNTHETIC_REJECTED = AUGMENTED / "rejected.jsonl"  # each candidate refused, and why

# --- reports --------------------------------------------------------------------------------
REPORTS = Path("reports")
DATA_DOCS = REPORTS / "data_docs"  # Great Expectations' Data Docs (validate)
METRICS = REPORTS / "metrics.json"  # base vs tuned (evaluate)
PREDICTIONS = REPORTS / "predictions.jsonl"  # every test answer of both models (evaluate)
REVIEW_SHEET = REPORTS / "review_sheet.csv"  # a sample of them for people to judge (evaluate)
PLOTS = REPORTS / "plots"  # plot data: loss curves, metric bars, confusion matrices
TRAIN_LOSS_CURVE = PLOTS / "train_loss.csv"  # step,loss (train)
EVAL_LOSS_CURVE = PLOTS / "eval_loss.csv"  # step,loss on the validation split (train)
CONFUSION = PLOTS / "confusion"  # <model>_<label field>.csv: actual,predicted (evaluate)
MANIFEST = REPORTS / "manifest.json"  # data, model and lock hashes (report)
MODEL_CARD = REPORTS / "model_card.md"  # (report)
SUMMARY = REPORTS / "summary.json"  # the numbers experiments are compared by (report)
REPORT_PAGE = REPORTS / "index.html"  # the whole run on one offline page (report)


def stage_report(stage: str) -> Path:
    """reports/<stage>.json: what a stage did, in numbers."""
    return REPORTS / f"{stage}.json"
