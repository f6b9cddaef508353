"""Serve models/merged behind an OpenAI-compatible HTTP API on loopback (`make serve`).

    python scripts/serve.py [--port 8001]

Runs `transformers serve` (transformers[serving]) with the merged model preloaded; host and port
come from `serve` in params.yaml. Then, from another shell:

    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "models/merged", "messages": [{"role": "user", "content": "I was charged twice."}]}'

Requests name any model; the preloaded one answers. Greedy decoding: pass "temperature": 0 or
leave sampling off (generation_config.json of the model decides by default).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

MERGED = Path("models/merged")


def command(params: dict, port: int | None = None) -> list[str]:
    import torch

    serve = params.get("serve") or {}
    # the model's own dtype on a GPU; fp32 on a CPU, where bf16 matmuls are ~500x slower
    dtype = "auto" if torch.cuda.is_available() else "float32"
    return [str(Path(sys.executable).parent / "transformers"), "serve", str(MERGED),
            "--host", str(serve.get("host", "127.0.0.1")),
            "--port", str(port or serve.get("port", 8000)), "--device", "auto", "--dtype", dtype]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=None, help="override serve.port")
    args = parser.parse_args()
    if not (MERGED / "config.json").exists():
        sys.exit(f"error: {MERGED} not found: run `make repro` (the export stage writes it)")
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    cmd = command(params, args.port)
    print("serving:", " ".join(cmd), flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; nothing to fetch
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
