"""serve: the exported model answers a chat completion over HTTP on loopback, in the task's
format (a tiny model fine-tuned on the tickets until it has learned the format), and only to
its owner: the API key, the Host and Origin headers, one pinned model, the training system
prompt. Most tests drive scripts/serve.py's app in-process (fastapi's TestClient) on the
untrained tiny model; one starts the real server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml
from conftest import ROOT, set_params
from helpers import ticket_rows

from stages import export, train, validate
from stages.common import feedback
from stages.common.config import StageError
from stages.common.files import read_jsonl, write_jsonl
from stages.common.task import Task

sys.path.insert(0, str(ROOT / "scripts"))
import serve

KEY = "test-key-4d1f0c9e"
BASE = "http://127.0.0.1:8000"
SYSTEM = ticket_rows(1)[0]["messages"][0]["content"]  # the tickets' system prompt
TICKET = [{"role": "user", "content": "I was charged twice for my subscription."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 60, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"} | (
        {"Authorization": f"Bearer {key}"} if key else {}
    )
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def settings(**changes) -> dict:
    return {
        "host": "127.0.0.1",
        "port": 8000,
        "api_key_env": "SERVE_API_KEY",
        "allowed_hosts": [],
        "add_system_prompt": True,
        "log_requests": False,
        "log_dir": "logs/serve",
        "retention_days": 30,
    } | changes


def client(
    model_dir, key: str | None = None, system_prompt: str | None = None, log=None, **changes
):
    from fastapi.testclient import TestClient

    app = serve.build_app(
        model_dir,
        key=key,
        names=serve.host_names(settings(**changes)),
        port=8000,
        system_prompt=system_prompt,
        dtype="float32",
        log=log,
    )
    return TestClient(app, base_url=BASE)


@pytest.fixture
def served(project, tiny_model_dir):
    """A project with models/merged (the untrained tiny model) and training records."""
    shutil.copytree(tiny_model_dir, project / "models/merged")
    write_jsonl(project / "data/processed/train.jsonl", ticket_rows(8))
    return project


@pytest.fixture
def no_uvicorn(monkeypatch):
    """serve.serve() builds the app and prints, then returns instead of serving."""
    import uvicorn

    ran = []

    def run(self, sockets):
        ran.append(self.config.app)
        for sock in sockets:  # an unclosed socket warns at a later garbage collection, into
            sock.close()  # whatever stderr capture is current then

    monkeypatch.setattr(uvicorn.Server, "run", run)
    # uvicorn.Config binds its log handlers to the sys.stderr of the moment (this test's
    # capture, closed after it); nothing is served here, so nothing needs them
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)
    return ran


# --- 1. the API key ---------------------------------------------------------------------------


def test_requests_without_the_key_get_401(tiny_model_dir):
    api = client(tiny_model_dir, key=KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        answer = api.get("/v1/models", headers=headers)
        assert answer.status_code == 401, headers
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["error"]["code"] == "invalid_api_key"
    assert api.post("/v1/chat/completions", json={"messages": TICKET}).status_code == 401
    assert api.get("/health").status_code == 401
    assert api.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_key_is_optional_on_loopback_only(monkeypatch):
    monkeypatch.delenv("SERVE_API_KEY", raising=False)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert serve.api_key(settings(host=host)) is None
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(serve.ServeError, match="is not loopback: set SERVE_API_KEY"):
            serve.api_key(settings(host=host))
    monkeypatch.setenv("MY_KEY", f" {KEY}\n")
    assert serve.api_key(settings(host="0.0.0.0", api_key_env="MY_KEY")) == KEY


def test_loopback_without_a_key_serves_and_says_so(served, no_uvicorn, capsys, monkeypatch):
    monkeypatch.delenv("SERVE_API_KEY", raising=False)
    serve.serve(free_port())
    out = capsys.readouterr().out
    assert "auth: none (SERVE_API_KEY is not set; loopback only)" in out
    assert len(no_uvicorn) == 1


def test_the_key_never_appears_in_output_or_params(served, no_uvicorn, capsys, monkeypatch):
    monkeypatch.setenv("SERVE_API_KEY", KEY)
    serve.serve(free_port())
    out = capsys.readouterr()
    assert "auth: requests need `Authorization: Bearer $SERVE_API_KEY`" in out.out
    assert KEY not in out.out + out.err
    assert KEY not in (served / "params.yaml").read_text()


def test_a_non_loopback_host_without_a_key_refuses_to_start(served):
    set_params(served, **{"serve.host": "0.0.0.0"})
    env = {k: v for k, v in os.environ.items() if k != "SERVE_API_KEY"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/serve.py")],
        cwd=served,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: serve.host=0.0.0.0 is not loopback: set SERVE_API_KEY")
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr


# --- 2. one pinned model ----------------------------------------------------------------------


def test_only_the_pinned_model_is_served(tiny_model_dir):
    api = client(tiny_model_dir)
    for path in ("/load_model", "/reset"):
        answer = api.post(path, json={"model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "model_pinned"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        answer = api.post(
            path, json={"model": "gpt2", "messages": TICKET, "prompt": "Hi", "input": "Hi"}
        )
        assert answer.status_code == 404, path
        assert answer.json()["error"]["code"] == "model_not_found"
    for path in ("/v1/systemone", "/v1/audio/transcriptions", "/docs", "/openapi.json"):
        assert api.post(path).status_code in (404, 405) and api.get(path).status_code == 404
    # the served name, or no name at all: the pinned model answers under its served name
    for body in ({"model": "models/merged"}, {}):
        answer = api.post(
            "/v1/chat/completions",
            json=body | {"messages": TICKET, "max_tokens": 2, "temperature": 0},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "models/merged"


# --- 3. the Host and Origin headers -----------------------------------------------------------


def test_the_host_header_must_name_this_server(tiny_model_dir):
    api = client(tiny_model_dir, host="0.0.0.0", allowed_hosts=["box.lan"])
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "BOX.lan:8000"):
        assert api.get("/v1/models", headers={"Host": host}).status_code == 200, host
    for host in (
        "evil.example:8000",
        "127.0.0.1:9999",
        "localhost",
        "0.0.0.0:8000",
        "127.0.0.1:8000.evil.example",
        "",
        "[::1",
    ):
        answer = api.get("/v1/models", headers={"Host": host})
        assert answer.status_code == 400, host
        assert answer.json()["error"]["code"] == "host_not_allowed"


def test_a_web_page_of_another_site_is_refused(tiny_model_dir):
    api = client(tiny_model_dir)
    for origin in ("http://evil.example", "http://127.0.0.1:3000", "null"):
        answer = api.post(
            "/v1/chat/completions", headers={"Origin": origin}, json={"messages": TICKET}
        )
        assert answer.status_code == 403, origin
    assert api.get("/v1/models", headers={"Origin": BASE}).status_code == 200


# --- 4. /v1/models ----------------------------------------------------------------------------


def test_models_lists_the_served_model(tiny_model_dir):
    api = client(tiny_model_dir)
    listed = api.get("/v1/models")
    assert listed.status_code == 200
    assert listed.json()["object"] == "list"
    assert [m["id"] for m in listed.json()["data"]] == ["models/merged"]
    assert api.get("/v1/models/models/merged").json()["id"] == "models/merged"
    assert api.get("/v1/models/gpt2").status_code == 404


# --- 5. the training system prompt ------------------------------------------------------------


def test_chat_answers_are_logged_and_rated_over_the_api(tiny_model_dir, tmp_path):
    """serve.log_requests: each chat answer (streamed or not) is logged under its id with the
    messages the model got; POST /v1/feedback rates one, and refuses what it cannot record."""
    log = feedback.FeedbackLog(tmp_path / "logs")
    api = client(tiny_model_dir, system_prompt=SYSTEM, log=log)
    ask = {"messages": TICKET, "max_tokens": 6, "temperature": 0}
    whole = api.post("/v1/chat/completions", json=ask).json()
    streamed = api.post("/v1/chat/completions", json=ask | {"stream": True}).text
    logged = read_jsonl(tmp_path / "logs/requests.jsonl")
    assert [e["id"] for e in logged][0] == whole["id"] and len(logged) == 2
    assert logged[0]["messages"] == [{"role": "system", "content": SYSTEM}, *TICKET]
    assert logged[0]["answer"] == whole["choices"][0]["message"]["content"]
    assert logged[1]["id"] in streamed and logged[1]["answer"]  # the stream's pieces, joined
    rated = api.post("/v1/feedback", json={"id": whole["id"], "rating": "bad", "correction": "X"})
    assert rated.status_code == 200 and rated.json()["correction"] == "X"
    for body, message in [
        ({"id": "chatcmpl-nope", "rating": "good"}, "no logged answer has the id"),
        ({"id": whole["id"], "rating": "meh"}, "rating 'meh': one of good, bad"),
        ({"id": whole["id"], "rating": "good", "correction": "X"}, "goes with the rating `bad`"),
    ]:
        refused = api.post("/v1/feedback", json=body)
        assert refused.status_code == 400 and message in refused.json()["error"]["message"]
    assert len(read_jsonl(tmp_path / "logs/feedback.jsonl")) == 1
    off = client(tiny_model_dir).post("/v1/feedback", json={"id": whole["id"], "rating": "good"})
    assert off.status_code == 404 and "serve.log_requests=true" in off.text


def test_feedback_export_makes_a_data_version_and_retention_prunes(tmp_path):
    log = feedback.FeedbackLog(tmp_path / "logs")
    prompt = [{"role": "user", "content": "Where is my parcel?"}]
    for n in range(4):
        log.answer(f"a{n}", prompt, f"answer {n}")
    log.rate("a0", "good")
    log.rate("a1", "good")
    log.rate("a1", "bad", "the right answer")  # the latest rating wins
    log.rate("a2", "bad")  # nothing to train on
    with pytest.raises(StageError, match="no logged answer has the id 'zzz'"):
        log.rate("zzz", "good")
    out = tmp_path / "data/raw/feedback"
    report = feedback.export(log.folder, out, stamp="t1")
    assert report["records"] == 2 and report["corrected"] == 1
    assert report["left_out"] == {"bad_without_correction": 1, "not_rated": 1}
    records = read_jsonl(out / "t1.jsonl")
    assert [r["messages"][-1]["content"] for r in records] == ["answer 0", "the right answer"]
    assert records[1]["feedback"] | {"answered_at": 0} == {
        "id": "a1",
        "rating": "bad",
        "corrected": True,
        "answered_at": 0,
    }
    # a second export adds only what is new; retention deletes old log entries, not the data
    log.rate("a3", "good")
    again = feedback.export(log.folder, out, stamp="t2")
    assert again["records"] == 1 and again["left_out"]["exported_before"] == 2
    assert log.prune(retention_days=1, now=time.time() + 2 * feedback.DAY) == 4 + 5
    assert read_jsonl(tmp_path / "logs/requests.jsonl") == [] and (out / "t1.jsonl").exists()
    assert feedback.export(log.folder, out, stamp="t3")["file"] is None


def test_the_system_prompt_is_the_training_records_most_common(tmp_path):
    rows = ticket_rows(6)
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    assert serve.training_system_prompt(path) == (SYSTEM, 6, 6)
    for row in rows[:4]:  # most records without a system message: none is added
        row["messages"] = row["messages"][1:]
    write_jsonl(path, rows + [{"prompt": [{"role": "system", "content": "P"}], "chosen": []}])
    assert serve.training_system_prompt(path) == (None, 4, 7)
    with pytest.raises(serve.StageError, match="not found: the system prompt"):
        serve.training_system_prompt(tmp_path / "missing.jsonl")


def test_a_chat_without_a_system_message_gets_the_training_one(tiny_model_dir):
    def prompt_tokens(api, messages, path="/v1/chat/completions") -> int:
        body = {"messages": messages, "max_tokens": 1, "temperature": 0}
        if path == "/v1/responses":
            body = {"input": messages, "max_output_tokens": 1, "temperature": 0, "stream": False}
        answer = api.post(path, json=body)
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        return usage.get("prompt_tokens") or usage["input_tokens"]

    ours, plain = client(tiny_model_dir, system_prompt=SYSTEM), client(tiny_model_dir)
    with_system = [{"role": "system", "content": SYSTEM}, *TICKET]
    for path in ("/v1/chat/completions", "/v1/responses"):
        trained = prompt_tokens(plain, with_system, path)
        assert prompt_tokens(ours, TICKET, path) == trained  # prepended
        assert prompt_tokens(plain, TICKET, path) != trained  # the template's own default
    # a system message of the request's own is kept
    own = [{"role": "system", "content": "Be brief."}, *TICKET]
    assert prompt_tokens(ours, own) == prompt_tokens(plain, own)


def test_startup_names_the_system_prompt(served, no_uvicorn, capsys):
    serve.serve(free_port())
    assert (
        "system prompt for chats without one: 'You triage customer-support tickets. Reply "
        "with one line...' (8 of 8 training records)" in capsys.readouterr().out
    )
    set_params(served, **{"serve.add_system_prompt": False})
    (served / "data/processed/train.jsonl").unlink()  # not read then
    serve.serve(free_port())
    assert "system prompt" not in capsys.readouterr().out


# --- 6. caches in the project; one-line errors ------------------------------------------------


def test_caches_default_to_the_project(served, no_uvicorn, monkeypatch):
    monkeypatch.delenv("HF_HOME")
    serve.serve(free_port())
    assert os.environ["HF_HOME"] == str(served / ".cache/huggingface")
    monkeypatch.setenv("HF_HOME", "/elsewhere")  # the user's environment wins
    serve.serve(free_port())
    assert os.environ["HF_HOME"] == "/elsewhere"


def test_a_busy_port_and_bad_settings_are_one_line_errors(served, capsys, monkeypatch):
    def error_of(*args) -> str:
        monkeypatch.setattr(sys, "argv", ["serve.py", *args])
        with pytest.raises(SystemExit) as exit_:
            serve.main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
        return err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert error_of("--port", str(busy.getsockname()[1])).startswith(
            "error: cannot listen on 127.0.0.1:"
        )
    good = yaml.safe_load((served / "params.yaml").read_text())["serve"]
    for key, value in [("api_key_env", "sk-abc def"), ("port", 0), ("allowed_hosts", [""])]:
        set_params(served, serve=good | {key: value})
        assert f"serve.{key}" in error_of()  # the schema's line, or ours
    set_params(served, serve={k: v for k, v in good.items() if k != "add_system_prompt"})
    assert "serve.add_system_prompt: missing" in error_of()


def run_serve_script(project):
    """scripts/serve.py started in `project` as a user would, its output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/serve.py")],
        cwd=project,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_without_an_exported_model_says_what_to_do(project):
    out = run_serve_script(project)
    assert out.returncode == 2
    assert (
        out.stderr == "error: models/merged not found: run `make repro` (the export stage "
        "writes it)\n"
    )


def test_an_adapter_that_cannot_merge_is_refused_in_one_line(project):
    """prefix and prompt tuning keep their adapter beside the base: transformers serve cannot
    run that, and says so before it loads anything."""
    merged = project / "models/merged"
    (merged / "adapter").mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    out = run_serve_script(project)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "keeps its adapter beside the base" in out.stderr and "Traceback" not in out.stderr


def test_a_reward_model_is_refused_in_one_line(project):
    merged = project / "models/merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}')
    out = run_serve_script(project)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "is a reward model" in out.stderr and "Traceback" not in out.stderr


# --- end to end: the real server, on a model trained to the task's format ---------------------


def test_served_model_answers_a_ticket_in_the_task_format(prepared, tmp_path):
    # full fine-tuning of the tiny model, long enough to learn the one-line JSON format
    write_jsonl(prepared / "data/processed/train.jsonl", ticket_rows(200)[:192])
    set_params(
        prepared,
        **{
            "serve.log_requests": True,  # production feedback, below
            "method": {"name": "full"},
            "train.learning_rate": 1e-2,
            "train.max_steps": 150,
            "train.per_device_train_batch_size": 16,
            "train.eval_steps": 50,
            "train.warmup_steps": 0.05,
            "export.check_examples": 2,
        },
    )
    train.main()
    test = ticket_rows(200)[192:]
    write_jsonl(prepared / "data/processed/test.jsonl", test)
    export.main()

    port = free_port()
    home = tmp_path / "home"  # nothing may be written outside the project
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "XDG_CACHE_HOME")}
    env |= {"HOME": str(home), "SERVE_API_KEY": KEY}
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/serve.py"), "--port", str(port)],
        cwd=prepared,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
            except urllib.error.HTTPError as err:  # up: it asks for the key
                assert err.code == 401
                break
            except OSError:
                assert time.time() < deadline, "server did not come up in 120 s"
                time.sleep(0.5)
        ticket = test[0]["messages"][1:2]  # the ticket alone: the server adds the system prompt
        reply = post(
            f"{url}/v1/chat/completions",
            {"model": "models/merged", "messages": ticket, "max_tokens": 24, "temperature": 0},
            key=KEY,
        )
        answer = reply["choices"][0]["message"]["content"]
        task = Task.from_params(yaml.safe_load((prepared / "params.yaml").read_text()))
        assert task.follows_format(answer), answer
        with pytest.raises(urllib.error.HTTPError, match="401"):
            post(f"{url}/v1/chat/completions", {"messages": ticket})
        # production feedback: rate the answer over the API, another one from the command line
        reference = test[0]["messages"][-1]["content"]
        post(
            f"{url}/v1/feedback",
            {"id": reply["id"], "rating": "bad", "correction": reference},
            key=KEY,
        )
        other = post(
            f"{url}/v1/chat/completions",
            {"messages": test[1]["messages"][1:2], "max_tokens": 24, "temperature": 0},
            key=KEY,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    output = server.stdout.read()
    assert "logging every chat answer to logs/serve" in output
    feedback_cli = [sys.executable, str(ROOT / "scripts/feedback.py")]
    subprocess.run([*feedback_cli, "rate", other["id"], "good"], cwd=prepared, check=True)
    # `make feedback`: a new data version under data/raw/feedback/, which validate then reads
    subprocess.run(["git", "init", "-q"], cwd=prepared, check=True)
    out = subprocess.run(
        [*feedback_cli, "export"], cwd=prepared, check=True, capture_output=True, text=True
    ).stdout
    assert "2 records (1 corrected)" in out and (prepared / "data/raw/feedback.dvc").exists()
    set_params(prepared, **{"data.path": ["data/raw/tickets.jsonl", "data/raw/feedback/*.jsonl"]})
    validate.main()
    fed = [
        r
        for r in read_jsonl(prepared / "data/interim/valid.jsonl")
        if "feedback" in r.get("meta", {})
    ]
    assert {r["meta"]["feedback"]["rating"]: r["messages"][-1]["content"] for r in fed} == {
        "bad": reference,  # trained as corrected
        "good": other["choices"][0]["message"]["content"],  # trained as answered
    }
    assert 'POST /v1/chat/completions HTTP/1.1" 200' in output
    assert KEY not in output
    assert list(home.iterdir()) == []
