"""Derive the bundled preference and raw-text sets from the ticket set (deterministic, seeded).

    python scripts/derive_objective_sets.py   # writes data/raw/tickets_preference.jsonl
                                              # and data/raw/tickets_text.jsonl

- Preference (objective=dpo): for every clean ticket, the prompt (system + ticket), the
  correct triage as `chosen`, and as `rejected` one of the mistakes a model really makes on
  this task, chosen by the seed: a wrong urgency, a wrong category (both in the right format),
  the right labels in prose instead of JSON, or the right JSON followed by chatter.
- Raw text (objective=cpt): the ticket texts alone, no labels: what continued pre-training on
  a support team's unlabelled inbox looks like.

Rows of the ticket set that are defective on purpose (no answer, off-format labels, broken
JSON) are left out; the data stages still validate, dedup and split both sets.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ANSWER = re.compile(r'\{"urgency": "(?P<urgency>[a-z]+)", "category": "(?P<category>[a-z]+)"\}')
URGENCIES = ["low", "medium", "high", "critical"]
CATEGORIES = ["billing", "technical", "account", "shipping", "product"]


def clean_tickets(path: Path) -> list[tuple[list[dict], str, dict]]:
    """(prompt messages, answer, its fields) of every well-formed ticket with a valid answer."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            continue
        if [m.get("role") for m in messages] != ["system", "user", "assistant"]:
            continue
        match = ANSWER.fullmatch(messages[2].get("content") or "")
        if not match or match["urgency"] not in URGENCIES or match["category"] not in CATEGORIES:
            continue
        out.append((messages[:2], messages[2]["content"], match.groupdict()))
    return out


def rejected_answer(fields: dict, rng: random.Random) -> str:
    mistake = rng.choice(["urgency", "category", "prose", "chatter"])
    if mistake == "urgency":
        wrong = rng.choice([u for u in URGENCIES if u != fields["urgency"]])
        return json.dumps({"urgency": wrong, "category": fields["category"]})
    if mistake == "category":
        wrong = rng.choice([c for c in CATEGORIES if c != fields["category"]])
        return json.dumps({"urgency": fields["urgency"], "category": wrong})
    if mistake == "prose":
        return f"This looks like a {fields['category']} issue with {fields['urgency']} urgency."
    return json.dumps(fields) + " Let me know if there is anything else I can help with!"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tickets", type=Path, default=Path("data/raw/tickets.jsonl"))
    parser.add_argument("--seed", type=int, default=20261123)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tickets = clean_tickets(args.tickets)
    preference, text = [], []
    for prompt, answer, fields in tickets:
        preference.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": rejected_answer(fields, rng)}],
            }
        )
        text.append({"text": prompt[1]["content"]})
    folder = args.tickets.parent
    for name, rows in (("tickets_preference.jsonl", preference), ("tickets_text.jsonl", text)):
        (folder / name).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        print(f"wrote {folder / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
