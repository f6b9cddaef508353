"""Serve models/merged behind an OpenAI-compatible HTTP API, to its owner only (`make serve`).

    export SERVE_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    python scripts/serve.py [--port 8001]

transformers serve's FastAPI app (transformers[serving]), built in this process with the merged
model preloaded, behind our own checks; host, port and the rest come from `serve` in
params.yaml (conf/serve/default.yaml). From another shell:

    curl -s http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $SERVE_API_KEY" \\
      -H 'Content-Type: application/json' -d '{"model": "models/merged", "temperature": 0,
      "max_tokens": 32, "messages": [{"role": "user", "content": "I was charged twice."}]}'

    from openai import OpenAI   # the key goes in the same header: Authorization: Bearer <key>
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=os.environ["SERVE_API_KEY"])
    client.chat.completions.create(model="models/merged", temperature=0, max_tokens=32,
                                   messages=[{"role": "user", "content": "I was charged twice."}])

Who gets an answer:
- The key: the environment variable named by `serve.api_key_env` (SERVE_API_KEY). When it is
  set, every request needs `Authorization: Bearer <key>` (else 401). On a loopback host
  (127.0.0.1, ::1, localhost) it may be unset: then nothing is asked, and the server says so
  when it starts; on any other host it refuses to start without one. The key is only ever read
  from the environment: never printed, logged or written to params.
- The Host header must name this server: a loopback name, `serve.host` or one of
  `serve.allowed_hosts`, with the port served (else 400: DNS rebinding). A browser request
  whose Origin is another site is refused (403), so no web page can drive the server.
- One model: models/merged, named "models/merged". A request may leave `model` out; one that
  names another model gets 404 (code model_not_found), as OpenAI answers. /load_model and
  /reset answer 403. GET /v1/models lists the one model.

Endpoints: POST /v1/chat/completions, /v1/responses (chat; streaming too), /v1/completions
(a raw prompt, no chat template), GET /v1/models, /v1/models/{model}, /health, and with
`serve.log_requests: true` POST /v1/feedback ({"id": <a chat answer's id>, "rating": "good" |
"bad", "correction"?: ...}; chat answers are then logged: stages/common/feedback.py). Anything else
(transformers' /v1/systemone and /v1/audio/transcriptions, FastAPI's /docs) answers 404.

The system prompt: a chat request without a system message gets the one the model was trained
with (`serve.add_system_prompt`), read from the records it was trained on,
data/processed/train.jsonl (the train stage's input, a DVC output): the most common first
system turn. Without it the chat template would put in its own default ("You are a helpful
AI assistant named SmolLM..."), a prompt the fine-tuned model never saw. When most training
records carry no system message, none is added. A /v1/responses request gets it as
`instructions` when it has neither. Send your own system message to override it.

Caches stay in the project: HF_HOME defaults to .cache/huggingface here (an HF_HOME set in
the environment wins), and the hub is offline: the model is local, nothing is fetched.
Greedy decoding: pass "temperature": 0 (else generation_config.json of the model decides).
"""

import argparse
import hmac
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.common import feedback, paths, tuned
from stages.common.config import StageError, load_params
from stages.common.kinds import training_system_prompt

MERGED = paths.MERGED
SERVED_NAME = str(paths.MERGED)  # the model's name in requests, answers and /v1/models
TRAIN = paths.TRAIN  # where the training system prompt is read
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class ServeError(Exception):
    """A bad setting or a missing file: one line, exit 2, never a traceback."""


# --- settings ---------------------------------------------------------------------------------


def serve_settings(params: dict) -> dict:
    """params.yaml's `serve` section; load_params checked its types (stages/common/schema.py)."""
    serve = params["serve"]  # every key is there: load_params refused a params.yaml without one
    if not all(serve["allowed_hosts"]):
        raise ServeError(
            f"params.yaml: serve.allowed_hosts={serve['allowed_hosts']!r}: an empty host name"
        )
    return serve


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key(serve: dict) -> str | None:
    """The key from the environment; None (no auth) is allowed on loopback only."""
    key = os.environ.get(serve["api_key_env"], "").strip()
    if not key and not is_loopback(serve["host"]):
        raise ServeError(
            f"serve.host={serve['host']} is not loopback: set "
            f"{serve['api_key_env']} to an API key first (clients send it as "
            "`Authorization: Bearer <key>`)"
        )
    return key or None


def host_names(serve: dict) -> set[str]:
    """The names a request's Host header may carry: loopback, serve.host, serve.allowed_hosts."""
    names = {*LOOPBACK_NAMES, *(h.lower().strip("[]") for h in serve["allowed_hosts"])}
    if serve["host"] not in WILDCARD_HOSTS:
        names.add(serve["host"].lower().strip("[]"))
    return names


# --- the app ----------------------------------------------------------------------------------


def error(status: int, message: str, code: str):
    """An OpenAI-style error answer (the openai client shows `message`)."""
    from fastapi.responses import JSONResponse

    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}},
        status_code=status,
        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None,
    )


def split_host(value: str) -> tuple[str, int | None]:
    """'name:port', '[::1]:port' or 'name' -> (lower-case name, port or None)."""
    name, port = value, None
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        name, port = value.split(":")
    try:
        return name.lower(), int(port) if port else None
    except ValueError:
        return name.lower(), -1


class OwnerOnly:
    """ASGI middleware, outermost: Host header, then Origin, then the bearer key."""

    def __init__(self, app, names: set[str], port: int, key: str | None):
        self.app, self.names, self.port, self.key = app, names, port, key

    def ours(self, name: str, port: int | None) -> bool:
        return name in self.names and port == self.port

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan (and no websocket routes here)
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        name, port = split_host(headers.get("host", ""))
        origin = urlsplit(headers.get("origin", ""))
        scheme_port = {"http": 80, "https": 443}.get(origin.scheme)
        if not self.ours(name, port if port is not None else 80):
            answer = error(
                400,
                f"Host {headers.get('host', '')!r} is not this server's: add the "
                "name to serve.allowed_hosts",
                "host_not_allowed",
            )
        elif "origin" in headers and not self.ours(
            (origin.hostname or "").lower(), origin.port or scheme_port
        ):
            answer = error(403, f"Origin {headers['origin']!r} is another site", "origin_refused")
        elif self.key and not hmac.compare_digest(
            headers.get("authorization", "").encode(), f"Bearer {self.key}".encode()
        ):
            answer = error(
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                "invalid_api_key",
            )
        else:
            return await self.app(scope, receive, send)
        await answer(scope, receive, send)


def pinned(handler_class: type, served_name: str) -> type:
    """`handler_class` that answers with the preloaded model, under its served name."""

    class Pinned(handler_class):
        def _resolve_model(self, body: dict):
            body["model"] = self.model_manager.force_model
            _, model, processor = super()._resolve_model(body)
            return served_name, model, processor

    return Pinned


def build_app(
    model_dir: Path,
    *,
    key: str | None,
    names: set[str],
    port: int,
    system_prompt: str | None,
    served_name: str = SERVED_NAME,
    dtype: str = "auto",
    log: feedback.FeedbackLog | None = None,
):
    """transformers serve's app with `model_dir` preloaded, our routes and checks in front;
    with `log`, every chat answer is logged with its id and POST /v1/feedback rates it."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.utils import GenerationState

    manager = ModelManager(device="auto", dtype=dtype, force_model=str(model_dir))
    state = GenerationState(continuous_batching=False, compile=False, cb_config=None)
    chat = pinned(ChatCompletionHandler, served_name)(manager, state)
    completion = pinned(CompletionHandler, served_name)(manager, state)
    response = pinned(ResponseHandler, served_name)(manager, state)
    app = build_server(
        manager,
        chat,
        completion_handler=completion,
        response_handler=response,
        transcription_handler=None,
        systemone_handler=None,  # routes dropped
        generation_state=state,
    )
    # keep its lifespan, middleware and /health; every other route is ours or gone (404)
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", "") == "/health"]

    def other_model(body: dict):
        if body.get("model") not in (None, served_name):
            return error(
                404,
                f"model {body['model']!r} is not served here: this server serves "
                f"only {served_name!r}",
                "model_not_found",
            )
        return None

    def has_system(turns) -> bool:
        return any(isinstance(t, dict) and t.get("role") == "system" for t in turns)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: dict):
        if refused := other_model(body):
            return refused
        messages = body.get("messages")
        if system_prompt and isinstance(messages, list) and not has_system(messages):
            body["messages"] = [{"role": "system", "content": system_prompt}, *messages]
        answered = await chat.handle_request(body, request.state.request_id)
        return logged(answered, body["messages"]) if log else answered

    def logged(answered, messages: list[dict]):
        """The answer as it goes out, logged with its id (a stream once it has ended)."""
        if isinstance(answered, JSONResponse):
            out = json.loads(answered.body)
            if out.get("choices"):
                log.answer(out["id"], messages, out["choices"][0]["message"].get("content") or "")
            return answered
        chunks = answered.body_iterator

        async def relay():
            answer_id, parts = None, []
            async for chunk in chunks:
                text = chunk.decode() if isinstance(chunk, bytes) else chunk
                for line in text.splitlines():
                    if line.startswith("data: ") and line[6:].strip() != "[DONE]":
                        event = json.loads(line[6:])
                        answer_id = event.get("id") or answer_id
                        for choice in event.get("choices") or []:
                            parts.append((choice.get("delta") or {}).get("content") or "")
                yield chunk
            if answer_id:
                log.answer(answer_id, messages, "".join(parts))

        answered.body_iterator = relay()
        return answered

    @app.post("/v1/feedback")
    async def rate(body: dict):
        """{"id": <an answer's id>, "rating": "good" | "bad", "correction"?: <the right answer>}"""
        if log is None:
            return error(
                404, "feedback needs the request log: serve.log_requests=true", "not_logging"
            )
        try:
            entry = log.rate(str(body.get("id")), str(body.get("rating")), body.get("correction"))
        except StageError as err:
            return error(400, str(err), "bad_feedback")
        return JSONResponse({"object": "feedback", **entry})

    @app.post("/v1/responses")
    async def responses(request: Request, body: dict):
        if refused := other_model(body):
            return refused
        turns = body.get("input") if isinstance(body.get("input"), list) else []
        if system_prompt and not body.get("instructions") and not has_system(turns):
            body["instructions"] = system_prompt
        return await response.handle_request(body, request.state.request_id)

    @app.post("/v1/completions")
    async def completions(request: Request, body: dict):
        return other_model(body) or await completion.handle_request(body, request.state.request_id)

    created = int((model_dir / "config.json").stat().st_mtime)
    card = {"id": served_name, "object": "model", "created": created, "owned_by": "local"}

    @app.get("/v1/models")
    def list_models():
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model:path}")
    def get_model(model: str):
        return other_model({"model": model}) or JSONResponse(card)

    @app.api_route("/load_model", methods=["GET", "POST"])
    @app.api_route("/reset", methods=["GET", "POST"])
    def pinned_model():
        return error(
            403,
            f"this server serves only {served_name!r}: it loads and unloads no model",
            "model_pinned",
        )

    app.add_middleware(OwnerOnly, names=names, port=port, key=key)
    return app


# --- the command ------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """Bind before the model loads, so a busy port fails in one line at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port}: {err.strerror or err} (another "
            "server there? pass --port)"
        ) from None
    return sock


def serve(port: int | None) -> None:
    if not (MERGED / "config.json").exists():
        raise ServeError(f"{MERGED} not found: run `make repro` (the export stage writes it)")
    if (MERGED / tuned.ADAPTER_DIR).is_dir():
        raise ServeError(
            f"{MERGED} keeps its adapter beside the base ({MERGED / tuned.ADAPTER_DIR}: prefix "
            f"and prompt tuning do not merge), and transformers serve runs plain models; train "
            f"with a method that merges (lora, dora, qlora, ia3, full) to serve it here"
        )
    if tuned.is_reward_model(MERGED):
        raise ServeError(
            f"{MERGED} is a reward model (objective=reward): it scores conversations, it does "
            f"not answer them; serve a model tuned with another objective"
        )
    try:
        settings = serve_settings(load_params())
    except StageError as err:  # not found, not YAML, or a key the schema refuses
        raise ServeError(str(err)) from None
    port = port or settings["port"]
    key = api_key(settings)
    names = host_names(settings)
    try:
        prompt, count, records = (
            training_system_prompt(TRAIN) if settings["add_system_prompt"] else (None, 0, 0)
        )
    except StageError as err:
        raise ServeError(str(err)) from None
    sock = listen(settings["host"], port)

    # caches in the project unless the environment says otherwise; the model is local
    os.environ.setdefault("HF_HOME", str(Path(".cache/huggingface").resolve()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import uvicorn

    # the model's own dtype on a GPU; fp32 on a CPU, where bf16 matmuls are ~500x slower
    dtype = "auto" if torch.cuda.is_available() else "float32"
    log = None
    if settings["log_requests"]:
        log = feedback.FeedbackLog(Path(settings["log_dir"]))
        pruned = log.prune(settings["retention_days"])
        print(
            f"logging every chat answer to {log.folder} (serve.log_requests; POST /v1/feedback "
            f"rates one); {pruned} entries older than {settings['retention_days']} days deleted"
        )
    try:
        app = build_app(
            MERGED, key=key, names=names, port=port, system_prompt=prompt, dtype=dtype, log=log
        )
    except Exception as err:  # noqa: BLE001  (one line, whatever the loader raised)
        raise ServeError(
            f"{MERGED}: cannot load it ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None

    env, host = settings["api_key_env"], settings["host"]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serving {MERGED} on {url} as model {SERVED_NAME!r} ({dtype})")
    print(
        f"auth: requests need `Authorization: Bearer ${env}`"
        if key
        else f"auth: none ({env} is not set; loopback only): anyone on this machine may call it"
    )
    print(f"Host header accepted: {', '.join(sorted(names))} (port {port})")
    if settings["add_system_prompt"]:
        shown = prompt if not prompt or len(prompt) <= 60 else prompt[:57].rstrip() + "..."
        print(
            f"system prompt for chats without one: {shown!r} ({count} of {records} "
            "training records)"
            if prompt
            else f"system prompt: none added ({count} of {records} training records had none)"
        )
    sys.stdout.flush()
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=None, help="override serve.port")
    args = parser.parse_args()
    try:
        serve(args.port)
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
