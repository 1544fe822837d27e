"""``difflab serve``: the web page and HTTP API of ``difflab.web`` for one model (and an
optional ``--compare`` model for A/B votes).
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    UserError,
    _add_adapter_args,
    _add_device_args,
    _add_model_args,
    _load_pipeline,
)


def add_serve_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a run over HTTP (a page to generate, browse, A/B-vote; POST /generate)",
        description="Serve RUN: GET / is a page to sample it with live progress, a gallery, "
        "human A/B evaluation and sweep results; GET /info its settings; POST /generate "
        "(JSON: n, class_labels, prompt, sampler, steps, guidance_scale, seed, spacing, nrow, "
        "...) returns a PNG grid with its parameters. README.md lists the HTTP API.",
    )
    p.add_argument(
        "run",
        help="a run directory, a diffusers Stable Diffusion folder or an SD .safetensors file",
    )
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--weights", default="ema", help="runs: ema, raw or a weights file")
    _add_model_args(p)
    _add_device_args(p)
    _add_adapter_args(p)
    p.add_argument("--max-n", type=int, default=64, help="largest n one request may ask for")
    p.add_argument("--token", default=None, help="access token (required off 127.0.0.1)")
    p.add_argument("--data-dir", default=None, help="gallery and A/B votes (default RUN/web)")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="PATH",
        help="another run or SD model that A/B experiments may set against this one "
        '(a side\'s "run": PATH); repeatable',
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ..interop.sd import path_kind
    from ..web import serve
    from ..web.app import is_loopback

    if not is_loopback(args.host) and not args.token:
        raise UserError(
            f"--host {args.host} opens the server beyond this machine; give it a --token "
            "(or serve on 127.0.0.1)"
        )
    for other in args.compare:  # a model A/B sides may name: it must load later
        path_kind(other)
    pipe = _load_pipeline(args)
    print(f"serving {args.run} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    serve(
        pipe, args.host, args.port, token=args.token, max_n=args.max_n, data_dir=args.data_dir,
        compare=args.compare,
    )  # fmt: skip
    return 0
