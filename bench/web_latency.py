"""Web server latency: what the page adds on top of a direct ``Pipeline`` call, and how fast
the server answers other requests while a batch samples.

A small class-conditional run (the ``tiny`` U-Net preset, random weights, 8x8 or
``--size``) is served on 127.0.0.1 by ``difflab.web`` (uvicorn on a thread, as in the
tests).  For each of ``--repeats`` rounds, taken in turn:

- *direct*: ``pipe(n, labels, steps=..., seed=...)`` plus the PNG encoding of its grid;
- *web*: ``POST /api/jobs`` then the job's server-sent events: the time to the first
  progress event (step 1) and to the ``done`` event plus ``GET`` of the final PNG — what a
  click on Generate waits for.  Gallery saving is off (``save: false``) so both sides do the
  same work.

The medians are reported, and the overhead = web / direct - 1 (goal: at most 5%).  Then,
while one long batch samples, ``--clients`` threads hit ``GET /static/app.js``,
``GET /api/info`` and ``GET /api/ab/ranking`` for ``--seconds`` each; requests/s and the
median latency are reported.  Every request goes to 127.0.0.1 only, and every loop is
bounded in count and time.

Usage::

    python bench/web_latency.py --steps 50 --n 16 --repeats 5 --out bench/results/web.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _tiny_run import make_tiny_run  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.images import make_grid, png_bytes  # noqa: E402
from difflab.web import WebServer, create_app  # noqa: E402


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def web_round(url: str, body: dict) -> tuple[float, float]:
    """(seconds to the first progress event, seconds to the final PNG in hand)."""
    t0 = time.perf_counter()
    job = _post(url + "/api/jobs", body)
    first = None
    with urllib.request.urlopen(f"{url}/api/jobs/{job['id']}/events", timeout=300) as resp:
        for raw in resp:
            line = raw.decode()
            if line.startswith("data: "):
                data = json.loads(line[6:])
                if first is None and data["step"] >= 1:
                    first = time.perf_counter() - t0
                if data["state"] in ("done", "error", "cancelled"):
                    break
    with urllib.request.urlopen(url + data["image"], timeout=300) as resp:
        resp.read()
    return first or float("nan"), time.perf_counter() - t0


def direct_round(pipe: dl.Pipeline, kwargs: dict) -> float:
    t0 = time.perf_counter()
    images = pipe(**kwargs, progress=False)
    png_bytes(make_grid(images), pipe.resolve_params(**kwargs))
    return time.perf_counter() - t0


def hammer(url: str, path: str, clients: int, seconds: float) -> tuple[float, float]:
    """(requests/s, median latency in ms) of ``clients`` threads GETting ``path``."""
    latencies: list[float] = []
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client() -> None:
        for _ in range(100_000):  # bounded
            if time.perf_counter() > end:
                return
            t0 = time.perf_counter()
            with urllib.request.urlopen(url + path, timeout=30) as resp:
                resp.read()
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - t0), 1000 * statistics.median(latencies)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", default=None, help="write the markdown table here too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp())
    run = make_tiny_run(tmp / "run", num_classes=4, steps=args.steps)
    pipe = dl.Pipeline.from_run(run)
    server = WebServer(create_app(dl.Pipeline.from_run(run), data_dir=tmp / "web", max_n=256))
    labels = [i % 4 for i in range(args.n)]
    kwargs = {"n": args.n, "class_labels": labels, "steps": args.steps, "seed": 0}
    body = {**kwargs, "save": False}
    direct_round(pipe, kwargs), web_round(server.url, body)  # warm-up
    direct, first, final = [], [], []
    for _ in range(args.repeats):
        direct.append(direct_round(pipe, kwargs))
        f, t = web_round(server.url, body)
        first.append(f)
        final.append(t)
    d, f, t = (statistics.median(v) for v in (direct, first, final))

    long = {"n": args.n, "class_labels": labels, "steps": 1000, "save": False}
    job = _post(server.url + "/api/jobs", long)
    rates = {}
    for path in ("/static/app.js", "/api/info", "/api/ab/ranking"):
        rates[path] = hammer(server.url, path, args.clients, args.seconds)
    busy = _post(server.url + f"/api/jobs/{job['id']}/cancel", {})
    server.stop()

    lines = [
        "# Web server latency (bench/web_latency.py)\n",
        f"Tiny 4-class U-Net, {pipe.pixel_shape[1]}x{pipe.pixel_shape[2]} images, n={args.n}, "
        f"{args.steps} DDIM steps, torch threads={args.threads}, {args.repeats} rounds "
        f"(medians), {torch.__version__}, CPU. Command: `python bench/web_latency.py "
        f"--steps {args.steps} --n {args.n} --repeats {args.repeats}`.\n",
        "| measure | seconds |",
        "|---|---|",
        f"| direct `Pipeline` call + PNG | {d:.3f} |",
        f"| web: click to first progress event | {f:.3f} |",
        f"| web: click to final image | {t:.3f} |",
        f"| web overhead (final / direct - 1) | {100 * (t / d - 1):+.1f}% |",
        "",
        f"While a batch samples (job at step {busy['step']} of {busy['total']} when stopped), "
        f"{args.clients} clients, {args.seconds:g} s per endpoint:\n",
        "| endpoint | requests/s | median latency (ms) |",
        "|---|---|---|",
        *(f"| GET {k} | {r:.0f} | {ms:.1f} |" for k, (r, ms) in rates.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
