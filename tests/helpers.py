"""Records the data-stage tests share: one good record of every kind, and builders for chat
records around the ticket task's answer format."""

from __future__ import annotations

SYSTEM = {"role": "system", "content": "Triage."}
GOOD = '{"urgency": "high", "category": "billing"}'  # an answer the ticket task accepts


def chat(user="I was charged twice.", answer=GOOD, **extra):
    return {
        "messages": [
            SYSTEM,
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
        **extra,
    }


def msgs(*turns, **extra):
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


# kind -> a record of that kind that validate keeps
GOOD_ROWS = {
    "messages": chat(),
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": "I was charged twice."},
            {"from": "gpt", "value": GOOD},
        ]
    },
    "alpaca": {
        "instruction": "Triage this ticket.",
        "input": "I was charged twice.",
        "output": GOOD,
    },
    "prompt_completion": {"prompt": "I was charged twice.", "completion": GOOD},
    "preference": {"prompt": "I was charged twice.", "chosen": GOOD, "rejected": "billing!"},
    "text": {"text": "Support handbook: refunds are issued within five days."},
}
