"""Production feedback from the command line, and `make feedback`.

    python scripts/feedback.py rate chatcmpl-123 bad --correction '{"urgency": "high", ...}'
    python scripts/feedback.py rate chatcmpl-124 good
    make feedback            # = python scripts/feedback.py export

`rate` records a rating of an answer the server logged (serve.log_requests), as POST
/v1/feedback does. `export` deletes log entries older than serve.retention_days, writes the rated
answers not exported before as chat records in data/raw/feedback/<time>.jsonl and `dvc add`s the
folder: a new data version. Train on it by adding "data/raw/feedback/*.jsonl" to data.path, then
`dvc repro` and `make regression` (the fixed test set does not move, so the versions compare).
What goes in and what is left out: stages/common/feedback.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.common import feedback  # noqa: E402
from stages.common.config import StageError, load_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rate = commands.add_parser("rate", help="rate a logged answer")
    rate.add_argument("id", help="the answer's id (the `id` of the chat completion)")
    rate.add_argument("rating", choices=feedback.RATINGS)
    rate.add_argument("--correction", help="the right answer (with `bad`)")
    commands.add_parser("export", help="rated answers -> data/raw/feedback/, dvc add")
    args = parser.parse_args()
    try:
        settings = load_params()["serve"]
        log = feedback.FeedbackLog(Path(settings["log_dir"]))
        if args.command == "rate":
            entry = log.rate(args.id, args.rating, args.correction)
            print(f"{entry['id']}: {entry['rating']}" + (" (corrected)" if args.correction else ""))
            return
        pruned = log.prune(settings["retention_days"])
        report = feedback.export(log.folder)
    except StageError as err:
        sys.exit(f"error: {err}")
    left_out = ", ".join(f"{k} {v}" for k, v in report["left_out"].items()) or "none"
    print(
        f"feedback: {report['answers_logged']} answers logged ({pruned} older than "
        f"{settings['retention_days']} days deleted); {report['records']} records "
        f"({report['corrected']} corrected) -> {report['file'] or 'nothing new'}; left out: "
        f"{left_out}"
    )
    if report["file"]:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "add", str(feedback.EXPORT_DIR)],
            check=False,
            capture_output=True,
        )
        if done.returncode:
            sys.exit(f"dvc add {feedback.EXPORT_DIR} failed: {done.stderr.decode().strip()}")
        print(
            f"next: git add {feedback.EXPORT_DIR}.dvc data/raw/.gitignore; put "
            f'"{feedback.EXPORT_DIR}/*.jsonl" in data.path; dvc repro; make regression'
        )


if __name__ == "__main__":
    main()
