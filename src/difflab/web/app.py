"""The ASGI application of ``difflab serve``: routes, limits, and the work the queue runs.

Owns ``create_app(pipe, ...)`` (a Starlette app) and ``WebServer`` (uvicorn on a thread, for
tests and benchmarks); the HTTP API is listed in README.md ("HTTP API").  Sampling never runs
on the event loop: ``/generate``, ``/api/jobs`` and ``/api/ab/pairs`` put a job on the
``JobQueue`` (one worker thread) and the loop only waits for it.  Every refusal is JSON
``{"error": ...}`` with a 4xx status; an unexpected failure is a 500 of the same shape and the
server stays up.  Limits: body size (``max_body``), queue length (``max_waiting``), request
time (``request_timeout``, streams and sampling waits excepted: those are bounded by
``generate_timeout``), ``n``, ``steps`` and image sides; an optional access token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..images import make_grid, png_bytes
from ..pipeline import Pipeline
from .ab import ABStore
from .gallery import Gallery
from .jobs import FINAL, Hub, Job, JobQueue, QueueFull
from .page import STATIC, info, render_page
from .validate import RequestError, check_config, check_generate, check_seed, parse_json

__all__ = ["WebServer", "create_app", "is_loopback"]

SWEEP_FILES = ("sweep.csv", "sweep.md", "sweep_nfe.png", "sweep_guidance.png", "sweep_tradeoff.png")
STREAMING = ("/events",)  # path endings exempt from the request timeout


def is_loopback(host: str) -> bool:
    """Whether ``host`` only reaches this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Limits:
    """ASGI middleware: access token, body size, request timeout, JSON errors."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int, timeout: float) -> None:
        self.app, self.token, self.max_body, self.timeout = app, token, max_body, timeout

    def _authorised(self, scope: Scope) -> tuple[bool, bool]:
        """(allowed, came in the query string: set the cookie)."""
        if self.token is None:
            return True, False
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        offered = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        offered.append(headers.get("x-difflab-token", ""))
        for part in headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == "difflab_token":
                offered.append(value)
        from urllib.parse import parse_qs

        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        ok = any(hmac.compare_digest(o.encode(), self.token.encode()) for o in offered if o)
        if not ok and query and hmac.compare_digest(query[0].encode(), self.token.encode()):
            return True, True
        return ok, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed, set_cookie = self._authorised(scope)
        if not allowed:
            await _error(
                401,
                "this server needs its access token (Authorization: Bearer TOKEN, "
                "or ?token=TOKEN once in the browser)",
            )(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _error(400, "Content-Length must be a number")(scope, receive, send)
                return
            if int(length) > self.max_body:
                await _error(413, f"request body over {self.max_body} bytes")(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise RequestError(f"request body over {self.max_body} bytes", 413)
            return message

        started = False

        async def tracked_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if set_cookie:
                    message["headers"] = [
                        *message.get("headers", []),
                        (
                            b"set-cookie",
                            f"difflab_token={self.token}; HttpOnly; SameSite=Strict; "
                            "Path=/".encode(),
                        ),
                    ]
            await send(message)

        call = self.app(scope, limited_receive, tracked_send)
        try:
            if scope["path"].endswith(STREAMING) or scope["path"] in ("/generate", "/api/ab/pairs"):
                await call
            else:
                await asyncio.wait_for(call, self.timeout)
        except asyncio.TimeoutError:
            if not started:
                await _error(504, f"the request took over {self.timeout:g} s")(scope, receive, send)
        except RequestError as err:
            if not started:
                await _error(err.status, str(err))(scope, receive, send)


class WebState:
    """What the routes share: the pipeline, queue, gallery, A/B store and limits."""

    def __init__(self, pipe: Pipeline, data_dir: Path, **limits: Any) -> None:
        self.pipe = pipe
        self.data_dir = data_dir
        self.limits = limits
        self.hub = Hub()
        self.queue = JobQueue(self._work, self.hub, max_waiting=limits["max_waiting"])
        self.gallery = Gallery(data_dir / "gallery")
        self.ab = ABStore(data_dir / "ab.sqlite")
        self._pipes: dict[str, Pipeline] = {}  # other checkpoints of the run, loaded on demand
        self.compare: list[str] = [str(p) for p in limits.get("compare", ())]  # other models
        self.lock = threading.Lock()

    def close(self) -> None:
        self.queue.close()
        self.ab.close()

    # ------------------------------------------------------------------ work (worker thread)
    def _work(self, job: Job) -> Any:
        if job.kind == "ab":
            return self._work_pair(job)
        kwargs, nrow, save = job.payload["kwargs"], job.payload["nrow"], job.payload["save"]
        images = self._sample(self.pipe, kwargs, job)
        params = self._params(self.pipe, kwargs)
        size = (images.shape[-1], images.shape[-2])
        grid = png_bytes(make_grid(images, nrow), params, size=size)
        names = self.gallery.save(images, params, job.id) if save else []
        public = {"image": f"/api/jobs/{job.id}/image", "seed": params["seed"], "gallery": names}
        return {"png": grid, "params": params, "public": public}

    def _sample(self, pipe: Pipeline, kwargs: dict[str, Any], job: Job | None) -> Any:
        def preview(x0: Any) -> bytes:
            pixels = x0 if pipe.vae is None else pipe.vae.images(x0.to(pipe.dtype))
            return png_bytes(make_grid(pixels.float().clamp(-1, 1)))

        def callback(i: int, t: float, x_t: Any, x0: Any) -> None:
            if job is not None:
                job.step(i + 1, None if x0 is None else (lambda: preview(x0)))

        return pipe(**kwargs, progress=False, callback=callback)

    @staticmethod
    def _params(pipe: Pipeline, kwargs: dict[str, Any]) -> dict[str, Any]:
        size = (kwargs.get("height"), kwargs.get("width"))
        rest = {k: v for k, v in kwargs.items() if k not in ("height", "width")}
        return pipe.resolve_params(**rest, size=None if size == (None, None) else size)

    def _pipe_for(self, config: dict[str, Any]) -> Pipeline:
        run = config.get("run")
        if run is not None:  # another model named at start (difflab serve --compare)
            key = f"run:{run}:{config.get('weights', 'ema')}"
            if key not in self._pipes:
                other = Pipeline.from_pretrained(
                    run, weights=config.get("weights", "ema"), device=self.pipe.device
                )
                self._pipes[key] = other.to(dtype=self.pipe.dtype)
            return self._pipes[key]
        weights = config.get("weights", self.pipe.weights or "ema")
        if weights == (self.pipe.weights or "ema"):
            return self.pipe
        if weights not in self._pipes:
            if self.pipe.run_dir is None or not Path(self.pipe.run_dir).is_dir():
                raise ValueError("weights= needs a difflab run (its ema and raw checkpoints)")
            other = Pipeline.from_run(self.pipe.run_dir, weights=weights, device=self.pipe.device)
            self._pipes[weights] = other.to(dtype=self.pipe.dtype)
        return self._pipes[weights]

    def _work_pair(self, job: Job) -> Any:
        from ..finetune import set_lora_scale

        experiment = self.ab.experiment(job.payload["experiment"])
        seed, condition = job.payload["seed"], job.payload["condition"]
        pngs = []
        for side, config in enumerate((experiment["a"], experiment["b"])):
            pipe = self._pipe_for(config)
            settings = {
                k: v for k, v in config.items() if k not in ("name", "weights", "lora_scale", "run")
            }
            kwargs = {"n": 1, "seed": seed, **condition, **settings}
            # every adapter's own multiplier, restored after this side (load_lora's scale)
            layers = [(m, m.multiplier) for m in pipe.model.modules() if hasattr(m, "multiplier")]
            if "lora_scale" in config:
                set_lora_scale(pipe.model, config["lora_scale"])
            try:
                images = self._sample(pipe, kwargs, None)
                params = self._params(pipe, kwargs)
            finally:
                for layer, multiplier in layers:
                    layer.multiplier = multiplier
            pngs.append(png_bytes(make_grid(images, 1, padding=0), params))
            job.step(side + 1)
        pair = self.ab.add_pair(experiment["id"], seed, condition, pngs[0], pngs[1])
        public = {
            "pair": pair["id"],
            "left": f"/api/ab/pairs/{pair['id']}/left",
            "right": f"/api/ab/pairs/{pair['id']}/right",
            "seed": seed,
            "condition": condition,
        }
        return {"public": public}

    # ------------------------------------------------------------------ helpers (loop)
    async def wait(self, job: Job, timeout: float) -> None:
        end = time.monotonic() + timeout
        while job.state not in FINAL:
            left = end - time.monotonic()
            if left <= 0:
                self.queue.cancel(job.id)
                raise RequestError(f"sampling took over {timeout:g} s and was cancelled", 504)
            await self.hub.wait(min(left, 1.0))

    def submit(self, kind: str, payload: dict[str, Any], total: int) -> Job:
        try:
            return self.queue.submit(kind, payload, total)
        except QueueFull as err:
            raise RequestError(f"the server is busy: {err}; try again shortly", 503) from None


async def _body(request: Request) -> dict[str, Any]:
    return parse_json(await request.body())


def _state(request: Request) -> WebState:
    return request.app.state.web


def _generate_args(web: WebState, data: dict[str, Any], extra: tuple[str, ...] = ()) -> tuple:
    lim = web.limits
    return check_generate(
        data,
        web.pipe,
        max_n=lim["max_n"],
        max_steps=lim["max_steps"],
        max_side=lim["max_side"],
        extra=extra,
    )


def _total(web: WebState, kwargs: dict[str, Any]) -> int:
    return int(kwargs.get("steps") or web.pipe.sample_defaults["steps"])


# ---------------------------------------------------------------------- routes: sampling
async def page(request: Request) -> Response:
    return HTMLResponse(render_page(_state(request).pipe, _state(request).limits))


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return _error(404, f"no static file {name!r}")
    kinds = {".js": "text/javascript", ".css": "text/css"}
    path = Path(__file__).parent / "static" / name
    return FileResponse(path, media_type=kinds[path.suffix], headers={"Cache-Control": "no-cache"})


async def get_info(request: Request) -> Response:
    return JSONResponse(info(_state(request).pipe, _state(request).limits))


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def generate(request: Request) -> Response:
    """``POST /generate``: a PNG grid, sampled through the queue (the old API)."""
    web = _state(request)
    kwargs, nrow = _generate_args(web, await _body(request))
    job = web.submit(
        "generate", {"kwargs": kwargs, "nrow": nrow, "save": False}, _total(web, kwargs)
    )
    await web.wait(job, web.limits["generate_timeout"])
    if job.state != "done":
        raise RequestError(job.error or f"the job was {job.state}", 400 if job.error else 409)
    header = {"X-Difflab-Params": json.dumps(job.result["params"], default=str)}
    return Response(job.result["png"], media_type="image/png", headers=header)


async def submit_job(request: Request) -> Response:
    web = _state(request)
    data = await _body(request)
    save = data.get("save", True)
    if not isinstance(save, bool):
        raise RequestError(f"save must be true or false, got {save!r}")
    kwargs, nrow = _generate_args(web, data, extra=("save",))
    job = web.submit(
        "generate", {"kwargs": kwargs, "nrow": nrow, "save": save}, _total(web, kwargs)
    )
    return JSONResponse(job.snapshot(), status_code=202)


def _job(request: Request) -> Job:
    job = _state(request).queue.get(request.path_params["job"])
    if job is None:
        raise HTTPException(404, f"no job {request.path_params['job']!r}")
    return job


async def get_job(request: Request) -> Response:
    return JSONResponse(_job(request).snapshot())


async def cancel_job(request: Request) -> Response:
    job = _job(request)
    _state(request).queue.cancel(job.id)
    return JSONResponse(job.snapshot())


async def job_image(request: Request) -> Response:
    job = _job(request)
    if job.state != "done" or job.kind != "generate":
        raise RequestError(f"job {job.id} has no image (state: {job.state})", 409)
    return Response(job.result["png"], media_type="image/png")


async def job_preview(request: Request) -> Response:
    job = _job(request)
    if job.preview is None:
        raise RequestError(f"job {job.id} has no preview yet", 404)
    return Response(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})


async def job_events(request: Request) -> Response:
    """Server-sent events: the job's state each time it changes, until it ends."""
    web, job = _state(request), _job(request)

    async def stream() -> AsyncIterator[bytes]:
        sent, preview_sent = -1, -1
        while True:
            if job.version != sent:
                sent = job.version
                data = job.snapshot()
                if job.preview is not None and job.preview_step != preview_sent:
                    preview_sent = job.preview_step
                    data["preview"] = f"/api/jobs/{job.id}/preview?step={job.preview_step}"
                state = data["state"]  # one reading: the worker may move on meanwhile
                yield f"event: {state}\ndata: {json.dumps(data)}\n\n".encode()
                if state in FINAL:
                    return
            elif await _idle(web, job):
                yield b": keep-alive\n\n"

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def _idle(web: WebState, job: Job) -> bool:
    """Wait for a change; True when 15 s passed without one (time for a keep-alive)."""
    version = job.version
    await web.hub.wait(15.0)
    return job.version == version


# ---------------------------------------------------------------------- routes: gallery
def _int_param(request: Request, key: str, lo: int, hi: int, default: int | None) -> int | None:
    text = request.query_params.get(key)
    if text in (None, ""):
        return default
    if not text.lstrip("-").isdigit() or not lo <= int(text) <= hi:
        raise RequestError(f"{key} must be an integer in {lo}..{hi}, got {text!r}")
    return int(text)


async def gallery_list(request: Request) -> Response:
    web = _state(request)
    query = request.query_params.get("q") or None
    label = _int_param(request, "class", 0, 1 << 30, None)
    offset = _int_param(request, "offset", 0, 1 << 30, 0) or 0
    limit = _int_param(request, "limit", 1, 500, 60) or 60
    total, items = await asyncio.to_thread(
        web.gallery.list, query=query, class_label=label, offset=offset, limit=limit
    )
    for item in items:
        item["url"] = f"/api/gallery/{item['name']}"
    return JSONResponse({"total": total, "offset": offset, "items": items})


def _gallery_name(request: Request) -> str:
    name = request.path_params["name"]
    try:
        _state(request).gallery.path(name)
    except FileNotFoundError as err:
        raise HTTPException(404, str(err)) from None
    return name


async def gallery_image(request: Request) -> Response:
    web, name = _state(request), _gallery_name(request)
    return FileResponse(web.gallery.path(name), media_type="image/png")


async def gallery_params(request: Request) -> Response:
    web, name = _state(request), _gallery_name(request)
    return JSONResponse({"name": name, "params": web.gallery.params(name)})


async def gallery_delete(request: Request) -> Response:
    web, name = _state(request), _gallery_name(request)
    web.gallery.delete(name)
    return JSONResponse({"deleted": name})


# ---------------------------------------------------------------------- routes: A/B
def _condition(web: WebState, data: Any) -> dict[str, Any]:
    """An experiment's condition: ``{"class_labels": [...]}`` (the classes pairs draw from;
    default all) or ``{"prompts": [...]}`` (text models)."""
    pipe = web.pipe
    data = {} if data is None else data
    if not isinstance(data, dict) or set(data) - {"class_labels", "prompts"}:
        raise RequestError('condition must be {"class_labels": [...]} or {"prompts": [...]}')
    if pipe.num_classes:
        labels = data.get("class_labels", list(range(pipe.num_classes)))
        if not (
            isinstance(labels, list)
            and labels
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < pipe.num_classes
                for v in labels
            )
        ):
            raise RequestError(
                f"class_labels must be a list of classes in 0..{pipe.num_classes - 1}"
            )
        return {"class_labels": labels}
    if pipe.context_dim is not None:
        prompts = data.get("prompts")
        if not (
            isinstance(prompts, list)
            and prompts
            and len(prompts) <= 100
            and all(isinstance(p, str) and len(p) <= 2000 for p in prompts)
        ):
            raise RequestError(
                "a text model's A/B condition needs prompts: a list of 1..100 strings"
            )
        return {"prompts": prompts}
    return {}


async def ab_create(request: Request) -> Response:
    web = _state(request)
    data = await _body(request)
    unknown = sorted(set(data) - {"name", "a", "b", "condition"})
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r} (allowed: name, a, b, condition)")
    loras = bool(web.pipe.loras)
    limits = dict(max_steps=web.limits["max_steps"], loras=loras, runs=web.compare)
    a = check_config(data.get("a"), **limits)
    b = check_config(data.get("b"), **limits)
    condition = _condition(web, data.get("condition"))
    name = data.get("name") or "experiment"
    if not isinstance(name, str) or len(name) > 80:
        raise RequestError(f"name must be a string of at most 80 characters, got {name!r}")
    try:  # settings the pipeline refuses are refused now, not at the first pair
        probe: dict[str, Any] = {"class_labels": 0} if web.pipe.num_classes else {}
        probe.update({"prompt": ""} if web.pipe.context_dim is not None else {})
        for config in (a, b):
            own = ("name", "weights", "lora_scale", "run")
            rest = {k: v for k, v in config.items() if k not in own}
            web.pipe.resolve_params(n=1, **probe, **rest)
    except ValueError as err:
        raise RequestError(str(err)) from None
    experiment_id = web.ab.add_experiment(name, a, b, condition)
    return JSONResponse(web.ab.experiment(experiment_id), status_code=201)


async def ab_list(request: Request) -> Response:
    return JSONResponse({"experiments": _state(request).ab.experiments()})


async def ab_pair(request: Request) -> Response:
    """A new pair for an experiment: same seed and condition, both configurations."""
    import secrets

    web = _state(request)
    data = await _body(request)
    experiment_id = data.get("experiment")
    if isinstance(experiment_id, bool) or not isinstance(experiment_id, int):
        raise RequestError(f"experiment must be an experiment id (integer), got {experiment_id!r}")
    try:
        experiment = web.ab.experiment(experiment_id)
    except KeyError as err:
        raise HTTPException(404, str(err.args[0])) from None
    seed = check_seed(data.get("seed", "random"))
    cond = experiment["condition"]
    condition: dict[str, Any] = {}
    if "class_labels" in cond:
        condition["class_labels"] = cond["class_labels"][
            secrets.randbelow(len(cond["class_labels"]))
        ]
    if "prompts" in cond:
        condition["prompt"] = cond["prompts"][secrets.randbelow(len(cond["prompts"]))]
    job = web.submit("ab", {"experiment": experiment_id, "seed": seed, "condition": condition}, 2)
    await web.wait(job, web.limits["generate_timeout"])
    if job.state != "done":
        raise RequestError(job.error or f"the pair was {job.state}", 400 if job.error else 409)
    return JSONResponse(job.result["public"], status_code=201)


async def ab_pair_image(request: Request) -> Response:
    try:
        data = _state(request).ab.pair_image(
            request.path_params["pair"], request.path_params["side"]
        )
    except KeyError as err:
        raise HTTPException(404, str(err.args[0])) from None
    return Response(data, media_type="image/png")


async def ab_vote(request: Request) -> Response:
    web = _state(request)
    data = await _body(request)
    pair, choice = data.get("pair"), data.get("choice")
    if not isinstance(pair, str) or not isinstance(choice, str) or set(data) - {"pair", "choice"}:
        raise RequestError(
            'a vote is {"pair": ID, "choice": "left" | "right" | "tie" | "both_bad"}'
        )
    try:
        return JSONResponse(web.ab.vote(pair, choice), status_code=201)
    except KeyError as err:
        raise HTTPException(404, str(err.args[0])) from None
    except FileExistsError as err:
        raise RequestError(str(err), 409) from None


def _experiment_param(request: Request) -> int | None:
    return _int_param(request, "experiment", 0, 1 << 62, None)


async def ab_ranking(request: Request) -> Response:
    return JSONResponse(_state(request).ab.ranking(_experiment_param(request)))


async def ab_ranking_csv(request: Request) -> Response:
    text = _state(request).ab.ranking_csv(_experiment_param(request))
    headers = {"Content-Disposition": 'attachment; filename="ab_ranking.csv"'}
    return Response(text, media_type="text/csv", headers=headers)


# ---------------------------------------------------------------------- routes: sweeps
def _sweep_dirs(web: WebState) -> dict[str, Path]:
    run = Path(web.pipe.run_dir or ".")
    if not run.is_dir():
        return {}
    found: dict[str, Path] = {}
    for log in sorted(run.glob("*/sweep.jsonl")) + sorted(run.glob("*/sweep.csv")):
        found.setdefault(log.parent.name, log.parent)
    return found


async def sweeps(request: Request) -> Response:
    import csv

    out = []
    for name, folder in _sweep_dirs(_state(request)).items():
        rows: list[dict[str, str]] = []
        if (folder / "sweep.csv").is_file():
            with open(folder / "sweep.csv", newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        files = [f for f in SWEEP_FILES if (folder / f).is_file()]
        out.append(
            {
                "name": name,
                "rows": rows,
                "columns": list(rows[0]) if rows else [],
                "plots": [f"/api/sweeps/{name}/{f}" for f in files if f.endswith(".png")],
                "files": [f"/api/sweeps/{name}/{f}" for f in files],
            }
        )
    return JSONResponse({"sweeps": out})


async def sweep_file(request: Request) -> Response:
    name, file = request.path_params["name"], request.path_params["file"]
    folder = _sweep_dirs(_state(request)).get(name)
    if folder is None or file not in SWEEP_FILES or not (folder / file).is_file():
        raise HTTPException(404, f"no sweep file {name}/{file}")
    kinds = {".png": "image/png", ".csv": "text/csv", ".md": "text/markdown"}
    return FileResponse(folder / file, media_type=kinds[Path(file).suffix])


# ---------------------------------------------------------------------- the app
async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no page {request.url.path!r} (see GET /info and README.md's HTTP API)"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return _error(exc.status_code, str(detail))


async def _request_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status", 400)
    headers = {"Retry-After": "5"} if status == 503 else None
    return _error(status, str(exc), headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(500, f"internal error: {type(exc).__name__}: {exc}")


def create_app(
    pipe: Pipeline,
    *,
    data_dir: str | Path | None = None,
    token: str | None = None,
    max_n: int = 64,
    max_steps: int = 1000,
    max_side: int | None = None,
    max_body: int = 1 << 16,
    max_waiting: int = 16,
    request_timeout: float = 30.0,
    generate_timeout: float = 600.0,
    compare: Sequence[str | Path] = (),
) -> Starlette:
    """The web app serving ``pipe``; its gallery and ``ab.sqlite`` live in ``data_dir``
    (default ``RUN/web``).  ``app.state.web.close()`` stops its worker.

    :param token: when set, every request must carry it (``Authorization: Bearer``, the
        ``X-Difflab-Token`` header, or ``?token=`` once, which sets a cookie).
    :param max_side: the largest height / width in pixels (default 4 × the model's side).
    :param compare: other models (runs, SD folders or files) an A/B side may name with
        ``"run": PATH``; each is loaded on first use.  Only these: a request never names a
        path the operator did not list.
    """
    if data_dir is None:
        run = Path(pipe.run_dir) if pipe.run_dir else Path.cwd()
        data_dir = (run if run.is_dir() else run.parent) / "web"
    side = max(pipe.pixel_shape[1:]) * 4 if max_side is None else max_side
    limits = dict(
        max_n=max_n,
        max_steps=max_steps,
        max_side=side,
        max_waiting=max_waiting,
        generate_timeout=generate_timeout,
        compare=[str(p) for p in compare],
    )
    web = WebState(pipe, Path(data_dir), **limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        web.hub.attach(asyncio.get_running_loop())
        yield
        web.close()

    routes = [
        Route("/", page),
        Route("/index.html", page),
        Route("/static/{name}", static),
        Route("/info", get_info),
        Route("/api/info", get_info),
        Route("/health", health),
        Route("/generate", generate, methods=["POST"]),
        Route("/api/jobs", submit_job, methods=["POST"]),
        Route("/api/jobs/{job}", get_job),
        Route("/api/jobs/{job}", cancel_job, methods=["DELETE"]),
        Route("/api/jobs/{job}/cancel", cancel_job, methods=["POST"]),
        Route("/api/jobs/{job}/events", job_events),
        Route("/api/jobs/{job}/image", job_image),
        Route("/api/jobs/{job}/preview", job_preview),
        Route("/api/gallery", gallery_list),
        Route("/api/gallery/{name}", gallery_image),
        Route("/api/gallery/{name}", gallery_delete, methods=["DELETE"]),
        Route("/api/gallery/{name}/params", gallery_params),
        Route("/api/ab/experiments", ab_list),
        Route("/api/ab/experiments", ab_create, methods=["POST"]),
        Route("/api/ab/pairs", ab_pair, methods=["POST"]),
        Route("/api/ab/pairs/{pair}/{side}", ab_pair_image),
        Route("/api/ab/votes", ab_vote, methods=["POST"]),
        Route("/api/ab/ranking", ab_ranking),
        Route("/api/ab/ranking.csv", ab_ranking_csv),
        Route("/api/sweeps", sweeps),
        Route("/api/sweeps/{name}/{file}", sweep_file),
    ]
    handlers = {
        HTTPException: _http_error,
        RequestError: _request_error,
        ValueError: _request_error,
        Exception: _server_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.web = web
    app.add_middleware(_Limits, token=token, max_body=max_body, timeout=request_timeout)
    return app


class WebServer:
    """``create_app`` behind uvicorn on a daemon thread: ``.url``, ``.stop()`` (tests, bench)."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        config = uvicorn.Config(
            app,
            log_level="warning",
            timeout_keep_alive=5,
            limit_concurrency=128,
            timeout_graceful_shutdown=3,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the web server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.web.close()
