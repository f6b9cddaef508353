"""Records the data-stage tests share: one good record of every kind, and builders for chat
records around the ticket task's answer format."""

from __future__ import annotations

import contextlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

from stages.common.records import record_id

ROOT = Path(__file__).resolve().parents[1]

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


URGENCIES, CATEGORIES = ["low", "medium", "high", "critical"], ["billing", "technical", "account"]


def labelled_rows(n=240):
    """n canonical chat records whose answers cycle through 4 urgencies x 3 categories."""
    out = []
    for i in range(n):
        answer = json.dumps({"urgency": URGENCIES[i % 4], "category": CATEGORIES[i % 3]})
        messages = [
            {"role": "user", "content": f"ticket {i}"},
            {"role": "assistant", "content": answer},
        ]
        out.append(
            {"id": record_id(messages), "source": "raw.jsonl", "line": i + 1, "messages": messages}
        )
    return out


def ticket_rows(n: int = 48) -> list[dict]:
    """Canonical chat records from the bundled tickets (system, user, assistant)."""
    rows = []
    for line in (ROOT / "data/raw/tickets.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        roles = [m.get("role") for m in record.get("messages", [])]
        if roles == ["system", "user", "assistant"] and record["messages"][2]["content"]:
            rows.append(
                {
                    "id": str(len(rows)),
                    "source": "raw.jsonl",
                    "line": len(rows) + 1,
                    "kind": "messages",
                    **record,
                }
            )
        if len(rows) == n:
            return rows
    return rows


def read_offline_run(run_dir: Path) -> dict:
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def write_preference_splits(root):
    """Processed train and validation splits of preference pairs: the ticket's answer chosen,
    prose rejected (a toy set a reward model separates)."""
    from stages.common.files import write_jsonl

    def pair(record, rejected):
        return {
            "id": record["id"],
            "source": "pref.jsonl",
            "line": record["line"],
            "kind": "preference",
            "prompt": record["messages"][:2],
            "chosen": [record["messages"][2]],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    rows = [pair(r, "Sounds like a billing issue, high priority.") for r in ticket_rows()]
    write_jsonl(root / "data/processed/train.jsonl", rows[:40])
    write_jsonl(root / "data/processed/validation.jsonl", rows[40:48])


@contextlib.contextmanager
def openai_endpoint(answer):
    """An OpenAI-compatible chat endpoint on loopback whose reply to each request body is
    `answer(body)`; it records every body, the first message of each (`prompts`) and the
    Authorization headers it was sent (`keys`)."""

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.bodies.append(body)
            server.prompts.append(body["messages"][0]["content"])
            server.keys.add(self.headers.get("Authorization"))
            out = json.dumps(
                {
                    "id": "1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": answer(body)},
                        }
                    ],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    server.bodies, server.prompts, server.keys = [], [], set()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
