"""``difflab serve``: a trained run behind a small HTTP API and a page to try it in a browser.

Owns the request format and the server; sampling is ``Pipeline.__call__`` and the PNG is
the same as ``difflab sample`` writes (its ``difflab`` text chunk holds every generation
parameter). Standard library only (``http.server``); one request samples at a time.

- ``GET /`` — an HTML form (class / prompt, sampler, steps, CFG, seed, n, guidance interval,
  APG) showing the grid;
- ``GET /info`` — JSON: the run, image shape, conditioning, sampling defaults, samplers;
- ``POST /generate`` — JSON body with any of ``n``, ``class_labels``, ``prompt``,
  ``sampler``, ``steps``, ``guidance_scale``, ``guidance_rescale``, ``guidance_interval``
  (``[sigma_lo, sigma_hi]``), ``apg`` (``{}`` or ``{"eta": ..., "momentum": ...,
  "norm_threshold": ...}``), ``eta``, ``seed``, ``spacing``, ``nrow``, ``negative_prompt``,
  ``negative_class``; answers
  ``image/png`` (parameters also in the ``X-Difflab-Params`` header), or status 400 with
  ``{"error": ...}`` naming what was wrong.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .images import make_grid, png_bytes
from .pipeline import Pipeline

__all__ = ["REQUEST_FIELDS", "make_server"]

REQUEST_FIELDS = ("n", "class_labels", "prompt", "sampler", "steps", "guidance_scale",
                  "guidance_rescale", "guidance_interval", "apg", "eta", "seed", "spacing",
                  "nrow", "negative_prompt", "negative_class")  # fmt: skip
MAX_BODY = 1 << 16


class RequestError(ValueError):
    """A request the server refuses (HTTP 400)."""


def parse_request(body: bytes, *, max_n: int, max_steps: int) -> dict[str, Any]:
    """The validated keyword arguments of a ``/generate`` body (JSON object)."""
    try:
        data = json.loads(body or b"{}")
    except json.JSONDecodeError as err:
        raise RequestError(f"the body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(data) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r} (allowed: {', '.join(REQUEST_FIELDS)})")
    n = data.get("n", 4)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise RequestError(f"n must be an integer in 1..{max_n}, got {n!r}")
    steps = data.get("steps")
    if steps is not None and (not isinstance(steps, int) or not 1 <= steps <= max_steps):
        raise RequestError(f"steps must be an integer in 1..{max_steps}, got {steps!r}")
    numbers = (("seed", int), ("guidance_scale", (int, float)), ("guidance_rescale", (int, float)),
               ("eta", (int, float)), ("nrow", int), ("negative_class", int))  # fmt: skip
    for key, kinds in numbers:
        value = data.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise RequestError(f"{key} must be a number, got {value!r}")
    interval = data.get("guidance_interval")
    if interval is not None and not (
        isinstance(interval, list)
        and len(interval) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
    ):
        raise RequestError(f"guidance_interval must be [sigma_lo, sigma_hi], got {interval!r}")
    apg = data.get("apg")
    if apg is not None and not (
        isinstance(apg, dict)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in apg.values())
    ):
        raise RequestError(f"apg must be an object of numbers (eta, momentum, ...), got {apg!r}")
    for key in ("prompt", "negative_prompt", "sampler", "spacing"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise RequestError(f"{key} must be a string, got {data[key]!r}")
    return data


def make_server(
    pipe: Pipeline,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_n: int = 64,
    max_steps: int = 1000,
    log: bool = True,
) -> ThreadingHTTPServer:
    """An HTTP server sampling ``pipe`` (``serve_forever()`` to run it; ``port=0`` picks a
    free port, see ``server.server_address``)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "difflab"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            if log:
                super().log_message(format, *args)

        def _send(self, status: int, body: bytes, kind: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode("utf-8"), "application/json")

        def do_GET(self) -> None:  # noqa: N802
            if self.path in ("/", "/index.html"):
                self._send(200, _page(pipe).encode("utf-8"), "text/html; charset=utf-8")
            elif self.path == "/info":
                self._json(200, _info(pipe))
            elif self.path == "/health":
                self._send(200, b"ok", "text/plain")
            else:
                self._json(404, {"error": f"no page {self.path!r} (try /, /info, /generate)"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/generate":
                self._json(404, {"error": f"POST to {self.path!r}: only /generate samples"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._json(413, {"error": f"request body over {MAX_BODY} bytes"})
                return
            try:
                req = parse_request(self.rfile.read(length), max_n=max_n, max_steps=max_steps)
                nrow = req.pop("nrow", None)
                req.setdefault("n", 4)
                with lock:
                    params = pipe.resolve_params(**req)
                    images = pipe(**req, progress=False)
            except (RequestError, ValueError, TypeError) as err:
                self._json(400, {"error": str(err)})
                return
            size = (images.shape[-1], images.shape[-2])  # one image, for A1111's Size
            body = png_bytes(make_grid(images, nrow), params, size=size)
            header = {"X-Difflab-Params": json.dumps(params, default=str)}
            self._send(200, body, "image/png", header)

    return ThreadingHTTPServer((host, port), Handler)


def _info(pipe: Pipeline) -> dict[str, Any]:
    from .samplers import SAMPLERS

    return {
        "run": pipe.run_dir,
        "weights": pipe.weights,
        "image_shape": list(pipe.image_shape),
        "latent": pipe.vae is not None,
        "num_classes": pipe.num_classes,
        "text": pipe.context_dim is not None,
        "defaults": pipe.sample_defaults,
        "samplers": sorted(SAMPLERS),
        "lora": pipe.loras,
    }


def _page(pipe: Pipeline) -> str:
    info = _info(pipe)
    cond = ""
    if info["num_classes"]:
        top = info["num_classes"] - 1
        cond += f'<label>class <input name="class_labels" type="number" min="0" max="{top}">'
        cond += "</label>"
        cond += '<label>negative class <input name="negative_class" type="number" min="0" '
        cond += f'max="{top}"></label>'
    if info["text"]:
        cond += '<label>prompt <input name="prompt" size="40"></label>'
        cond += '<label>negative prompt <input name="negative_prompt" size="30"></label>'
    d = info["defaults"]
    return f"""<!doctype html><meta charset="utf-8"><title>difflab: {info["run"]}</title>
<style>body{{font:14px sans-serif;margin:2em}} label{{margin-right:1em}}
img{{image-rendering:pixelated;width:512px;margin-top:1em}}</style>
<h1>difflab</h1><p>{info["run"]} ({info["weights"]} weights, image {info["image_shape"]})</p>
<form id="f">{cond}
<label>sampler <input name="sampler" value="{d["sampler"]}"></label>
<label>steps <input name="steps" type="number" value="{d["steps"]}" min="1"></label>
<label>CFG <input name="guidance_scale" type="number" step="0.1"
  value="{d["guidance_scale"]}"></label>
<label>seed <input name="seed" type="number" value="0"></label>
<label>n <input name="n" type="number" value="16" min="1"></label>
<br><label>guide only at σ from <input name="interval_lo" type="number" step="any" size="6">
  to <input name="interval_hi" type="number" step="any" size="6"></label>
<label><input name="apg" type="checkbox"> APG</label>
<button>generate</button></form><p id="msg"></p><img id="out" alt="">
<script>
document.getElementById("f").onsubmit = async (e) => {{
  e.preventDefault();
  const body = {{}}, form = new FormData(e.target);
  for (const [k, v] of form) if (v !== "" && !["interval_lo", "interval_hi", "apg"].includes(k))
    body[k] = ["prompt", "negative_prompt", "sampler"].includes(k) ? v : Number(v);
  if (form.get("interval_lo") !== "" || form.get("interval_hi") !== "")
    body.guidance_interval = [Number(form.get("interval_lo") || 0),
                              Number(form.get("interval_hi") || 1e30)];
  if (form.get("apg")) body.apg = {{}};
  const msg = document.getElementById("msg");
  msg.textContent = "sampling...";
  const r = await fetch("/generate", {{method: "POST", body: JSON.stringify(body)}});
  if (!r.ok) {{ msg.textContent = (await r.json()).error; return; }}
  msg.textContent = r.headers.get("X-Difflab-Params");
  document.getElementById("out").src = URL.createObjectURL(await r.blob());
}};
</script>"""
