"""Tiny runs behind a live web server (uvicorn on a thread), and a small HTTP client."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from _tiny_run import make_tiny_run  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.web import WebServer, create_app  # noqa: E402

TEXT = [
    "model.num_classes=null",
    "text.encoder=transformer",
    "text.width=16",
    "text.heads=2",
    "text.layers=1",
    "text.max_length=8",
    "data.source=digits",
    "train.max_steps=1",
]


def class_run(root: Path, steps: int = 3) -> Path:
    """A 4-class 8x8 run whose untouched defaults sample in ``steps`` DDIM steps."""
    return make_tiny_run(root / "class_run", num_classes=4, steps=steps)


def text_run(root: Path) -> Path:
    """A text-conditional 8x8 run (one training step on the digits captions)."""
    from train_helpers import tiny_config

    from difflab.train import train

    run = root / "text_run"
    train(tiny_config(run, *TEXT, "sample.steps=3"), progress=False)
    return run


def start(run: Path, **options: Any) -> WebServer:
    return WebServer(create_app(dl.Pipeline.from_run(run), **options))


def call(
    url: str, method: str, path: str, body: Any = None, headers: dict | None = None
) -> tuple[int, Any, Any]:
    """(status, headers, JSON or bytes) of one request; ``body`` is JSON unless bytes."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, head, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, head, raw = err.code, err.headers, err.read()
    if "json" in (head.get("Content-Type") or ""):
        return status, head, json.loads(raw)
    return status, head, raw
