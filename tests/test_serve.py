"""serve: the exported model answers a chat completion over HTTP on loopback, in the task's
format (a tiny model fine-tuned on the tickets until it has learned the format)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, set_params
from stages import export, train
from stages.common.files import read_jsonl, write_jsonl
from stages.common.task import Task
from test_train import prepared, ticket_rows  # noqa: F401  (fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_served_model_answers_a_ticket_in_the_task_format(prepared):  # noqa: F811
    # full fine-tuning of the tiny model, long enough to learn the one-line JSON format
    write_jsonl(prepared / "data/processed/train.jsonl", ticket_rows(200)[:192])
    set_params(prepared, **{"method": {"name": "full"}, "train.learning_rate": 1e-2,
                            "train.max_steps": 150, "train.per_device_train_batch_size": 16,
                            "train.eval_steps": 50, "train.warmup_ratio": 0.05,
                            "export.check_examples": 2})
    train.main()
    test = ticket_rows(200)[192:]
    write_jsonl(prepared / "data/processed/test.jsonl", test)
    export.main()

    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts/serve.py"), "--port", str(port)],
                              cwd=prepared, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up in 120 s"
                time.sleep(0.5)
        ticket = test[0]["messages"][:2]
        reply = post(f"http://127.0.0.1:{port}/v1/chat/completions",
                     {"model": "models/merged", "messages": ticket, "max_tokens": 24,
                      "temperature": 0})
        answer = reply["choices"][0]["message"]["content"]
        task = Task.from_params(__import__("yaml").safe_load((prepared / "params.yaml").read_text()))
        assert task.follows_format(answer), answer
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_without_an_exported_model_says_what_to_do(project):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/serve.py")], cwd=project,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "models/merged not found: run `make repro`" in out.stderr
    assert "Traceback" not in out.stderr
