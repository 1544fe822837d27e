"""The web server's HTTP API: each endpoint answers what the Pipeline samples, and every
hostile request gets a 4xx with a JSON error while the server stays up."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from web_helpers import call, start

import difflab as dl
from difflab.images import PNG_KEY, make_grid


def _alive(url):
    status, _, body = call(url, "GET", "/health")
    assert status == 200 and body == b"ok"


def _events(url, job_id):
    """The server-sent events of a job, as (event, data) pairs, until it ends."""
    out = []
    with urllib.request.urlopen(f"{url}/api/jobs/{job_id}/events", timeout=60) as resp:
        event = None
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
    return out


def test_generate_returns_the_pipelines_grid_with_its_parameters(server, runs):
    body = {
        "n": 3,
        "class_labels": [0, 1, 2],
        "sampler": "ddim",
        "steps": 3,
        "seed": 5,
        "guidance_scale": 2.0,
        "guidance_rescale": 0.5,
        "guidance_interval": [0.1, 20],
        "eta": 0.2,
        "nrow": 3,
    }
    status, headers, data = call(server.url, "POST", "/generate", body)
    assert status == 200 and headers["Content-Type"] == "image/png"
    png = Image.open(io.BytesIO(data))
    params = json.loads(png.text[PNG_KEY])
    assert params["class_labels"] == [0, 1, 2] and params["seed"] == 5 and params["steps"] == 3
    assert params["guidance_interval"] == [0.1, 20.0] and params["eta"] == 0.2
    assert json.loads(headers["X-Difflab-Params"])["sampler"] == "ddim"
    pipe = dl.Pipeline.from_run(runs["class"])
    kwargs = {k: v for k, v in body.items() if k != "nrow"}
    expected = make_grid(pipe(**kwargs, progress=False), 3)
    assert np.array_equal(np.asarray(png), np.asarray(expected))


BAD = [
    ({"n": 100}, 400, "n must be an integer in 1..8"),
    ({"n": 0}, 400, "n must be an integer in 1..8"),
    ({"n": True}, 400, "n must be an integer"),
    ({"n": 2.0}, 400, "n must be an integer"),
    ({"colour": "red"}, 400, "unknown field 'colour'"),
    ({"class_labels": [9]}, 400, "class labels must lie in 0..3"),
    ({"class_labels": [True]}, 400, "class_labels must be an integer"),
    ({"sampler": "warp"}, 400, "unknown sampler"),
    ({"sampler": 3}, 400, "sampler must be a string"),
    ({"spacing": "wobbly"}, 400, "unknown spacing 'wobbly'"),
    ({"steps": 0}, 400, "steps must be an integer"),
    ({"steps": 10**6}, 400, "steps must be an integer in 1..1000"),
    ({"guidance_scale": True}, 400, "guidance_scale must be a number"),
    ({"guidance_scale": 1e308 * 10}, 400, "must be finite"),
    ({"guidance_interval": 5}, 400, "guidance_interval must be [sigma_lo, sigma_hi]"),
    ({"guidance_interval": [5, 1]}, 400, "sigma_lo < sigma_hi"),
    ({"eta": "x"}, 400, "eta must be a number"),
    ({"negative_prompt": 3}, 400, "negative_prompt must be a string"),
    ({"class_labels": 1, "negative_class": 4}, 400, "class labels must lie in 0..3"),
    ({"apg": [1, 2]}, 400, "apg must be an object of numbers"),
    ({"apg": {"beta": 1}}, 400, "unknown APG option"),
    ({"seed": 12345678901234567890}, 400, "seed must be an integer in 0..9007199254740991"),
    ({"seed": -5}, 400, "seed must be an integer"),
    ({"seed": "lucky"}, 400, "seed must be an integer"),
    ({"nrow": 0}, 400, "nrow must be an integer in 1..4"),
    ({"nrow": -2}, 400, "nrow must be an integer in 1..4"),
    ({"n": 2, "nrow": 3}, 400, "nrow must be an integer in 1..2"),
    ({"height": 0}, 400, "height must be an integer in 1..32"),
    ({"width": 10**6}, 400, "width must be an integer in 1..32"),
    ({"prompt": "a cat"}, 400, "no text conditioning"),
    (b"not json", 400, "not JSON"),
    (b'{"eta": NaN}', 400, "NaN"),
    (b'{"eta": Infinity}', 400, "Infinity"),
    (b'{"eta": 1e999}', 400, "must be finite"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"[" * 100000, 413, "request body over"),
]


@pytest.mark.parametrize("body, status, message", BAD)
def test_bad_requests_get_a_4xx_json_error_and_the_server_stays_up(server, body, status, message):
    if isinstance(body, dict) and body.get("guidance_scale") == float("inf"):
        body = b'{"guidance_scale": 1e400}'
    for path in ("/generate", "/api/jobs"):
        code, headers, data = call(server.url, "POST", path, body)
        assert code == status and headers["Content-Type"] == "application/json", data
        assert message in data["error"]
    _alive(server.url)


def test_random_seed_is_drawn_and_reported(server):
    status, headers, _ = call(
        server.url, "POST", "/generate", {"n": 1, "class_labels": 0, "seed": "random"}
    )
    assert status == 200
    seed = json.loads(headers["X-Difflab-Params"])["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32


def test_info_page_static_and_unknown_paths(server, runs):
    status, _, info = call(server.url, "GET", "/info")
    assert status == 200 and info["num_classes"] == 4 and info["run"] == str(runs["class"])
    assert "ddim" in info["samplers"] and "DPM++ 2M" in info["a1111_names"]["dpmpp_2m"]
    assert info["limits"]["max_n"] == 8 and call(server.url, "GET", "/api/info")[2] == info
    page = call(server.url, "GET", "/")[2].decode()
    assert '<select name="class_labels">' in page and 'name="interval_lo"' in page
    assert 'value="ddim" selected' in page  # the run's default sampler
    assert "http" not in page.replace('"/static', "").split("<body")[0].lower()  # no CDN
    for name in ("app.js", "style.css"):
        status, headers, body = call(server.url, "GET", f"/static/{name}")
        assert status == 200 and len(body) > 500
    assert call(server.url, "GET", "/static/../app.py")[0] == 404
    for method, path in (
        ("GET", "/nothing"),
        ("GET", "/api/jobs/nope"),
        ("DELETE", "/api/jobs/nope"),
        ("GET", "/api/gallery/x.png"),
        ("GET", "/api/ab/pairs/zz/left"),
        ("GET", "/api/sweeps/x/sweep.md"),
    ):
        status, headers, data = call(server.url, method, path)
        assert status == 404 and "error" in data, path
    status, _, data = call(server.url, "PUT", "/generate", {})
    assert status == 405 and "PUT is not allowed" in data["error"]


def test_a_job_streams_progress_to_100_percent_with_previews_then_the_image(server, runs):
    body = {"n": 2, "class_labels": [1, 3], "steps": 4, "seed": 11, "sampler": "euler"}
    status, _, job = call(server.url, "POST", "/api/jobs", body)
    assert status == 202 and job["state"] in ("queued", "running") and job["total"] == 4
    events = _events(server.url, job["id"])
    steps = [d["step"] for e, d in events if e == "running"]
    assert steps == sorted(steps) and events[-1][0] == "done", events
    done = events[-1][1]
    assert done["step"] == done["total"] == 4 and done["seed"] == 11
    previews = [d["preview"] for _, d in events if "preview" in d]
    assert previews and call(server.url, "GET", previews[-1])[1]["Content-Type"] == "image/png"
    png = Image.open(io.BytesIO(call(server.url, "GET", done["image"])[2]))
    pipe = dl.Pipeline.from_run(runs["class"])
    expected = make_grid(pipe(2, [1, 3], sampler="euler", steps=4, seed=11, progress=False))
    assert np.array_equal(np.asarray(png), np.asarray(expected))
    # each image is in the gallery with its own parameters: n=1, seed + i, its class
    names = done["gallery"]
    assert len(names) == 2
    params = call(server.url, "GET", f"/api/gallery/{names[1]}/params")[2]["params"]
    assert params["n"] == 1 and params["seed"] == 12 and params["class_labels"] == [3]
    one = Image.open(io.BytesIO(call(server.url, "GET", f"/api/gallery/{names[1]}")[2]))
    alone = pipe(1, [3], sampler="euler", steps=4, seed=12, progress=False)
    assert np.array_equal(np.asarray(one), np.asarray(make_grid(alone, 1, padding=0)))
    assert call(server.url, "GET", f"/api/jobs/{job['id']}")[2]["state"] == "done"


def test_gallery_filters_deletes_and_survives_a_restart(runs, tmp_path):
    srv = start(runs["class"], data_dir=tmp_path)
    try:
        for label in (0, 2):
            job = call(srv.url, "POST", "/api/jobs", {"n": 1, "class_labels": label})[2]
            assert _events(srv.url, job["id"])[-1][0] == "done"
        job = call(srv.url, "POST", "/api/jobs", {"n": 1, "class_labels": 1, "save": False})[2]
        assert _events(srv.url, job["id"])[-1][1]["gallery"] == []
        assert call(srv.url, "POST", "/api/jobs", {"save": 1})[0] == 400
    finally:
        srv.stop()
    srv = start(runs["class"], data_dir=tmp_path)  # a new server on the same folder
    try:
        listing = call(srv.url, "GET", "/api/gallery")[2]
        assert listing["total"] == 2
        only = call(srv.url, "GET", "/api/gallery?class=2")[2]
        assert only["total"] == 1 and only["items"][0]["params"]["class_labels"] == [2]
        assert call(srv.url, "GET", "/api/gallery?class=x")[0] == 400
        assert call(srv.url, "GET", "/api/gallery?limit=0")[0] == 400
        name = only["items"][0]["name"]
        assert call(srv.url, "DELETE", f"/api/gallery/{name}")[0] == 200
        assert call(srv.url, "GET", "/api/gallery")[2]["total"] == 1
        assert call(srv.url, "DELETE", f"/api/gallery/{name}")[0] == 404
    finally:
        srv.stop()


def test_text_model_generates_from_prompts_and_refuses_class_labels(runs, tmp_path):
    srv = start(runs["text"], data_dir=tmp_path)
    try:
        info = call(srv.url, "GET", "/info")[2]
        assert info["text"] and info["num_classes"] is None and info["prompts"]
        body = {"n": 2, "prompt": info["prompts"][0], "negative_prompt": "", "seed": 3}
        status, headers, data = call(srv.url, "POST", "/generate", body)
        assert status == 200
        pipe = dl.Pipeline.from_run(runs["text"])
        expected = make_grid(
            pipe(2, prompt=info["prompts"][0], negative_prompt="", seed=3, progress=False)
        )
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(expected))
        status, _, data = call(srv.url, "POST", "/generate", {"class_labels": 1})
        assert status == 400 and "conditioned on text" in data["error"]
        status, _, data = call(srv.url, "POST", "/generate", {"prompt": ["a", "b"], "n": 3})
        assert status == 400 and "3 strings" in data["error"]
        page = call(srv.url, "GET", "/")[2].decode()
        assert 'name="prompt"' in page and 'name="class_labels"' not in page
    finally:
        srv.stop()


def test_cancel_a_running_job_and_a_queued_one_and_the_queue_bound(runs, tmp_path):
    srv = start(runs["class"], data_dir=tmp_path, max_waiting=1)
    try:
        long = {"n": 1, "class_labels": 0, "steps": 1000, "sampler": "euler"}
        first = call(srv.url, "POST", "/api/jobs", long)[2]
        second = call(srv.url, "POST", "/api/jobs", long)[2]
        assert second["state"] == "queued" and second["position"] == 0
        status, headers, data = call(srv.url, "POST", "/api/jobs", long)
        assert status == 503 and "busy" in data["error"] and headers["Retry-After"]
        while call(srv.url, "GET", f"/api/jobs/{first['id']}")[2]["step"] < 2:
            time.sleep(0.02)
        _alive(srv.url)  # the loop answers while a batch samples
        assert call(srv.url, "DELETE", f"/api/jobs/{second['id']}")[2]["state"] == "cancelled"
        assert call(srv.url, "POST", f"/api/jobs/{first['id']}/cancel")[0] == 200
        assert _events(srv.url, first["id"])[-1][0] == "cancelled"
        status, _, data = call(srv.url, "GET", f"/api/jobs/{first['id']}/image")
        assert status == 409 and "cancelled" in data["error"]
    finally:
        srv.stop()


def test_token_guards_every_request(runs, tmp_path):
    srv = start(runs["class"], data_dir=tmp_path, token="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, _, data = call(srv.url, "GET", "/info", headers=headers)
            assert status == 401 and "token" in data["error"]
        assert call(srv.url, "GET", "/info", headers={"Authorization": "Bearer s3cret"})[0] == 200
        status, headers, _ = call(srv.url, "GET", "/?token=s3cret")
        assert status == 200 and "difflab_token=s3cret" in headers["Set-Cookie"]
        assert call(srv.url, "GET", "/info", headers={"Cookie": "difflab_token=s3cret"})[0] == 200
    finally:
        srv.stop()
    from difflab.web import serve

    with pytest.raises(ValueError, match="give it a --token"):
        serve(None, "0.0.0.0", 0)


def test_ab_pairs_votes_ranking_and_csv_are_durable(runs, tmp_path):
    srv = start(runs["class"], data_dir=tmp_path)
    try:
        bad = [
            ({"a": {"steps": 0}, "b": {}}, "steps must be an integer"),
            ({"a": {"colour": 1}, "b": {}}, "unknown configuration field 'colour'"),
            ({"a": {}, "b": {"lora_scale": 0.5}}, "needs a LoRA adapter"),
            ({"a": [], "b": {}}, "must be an object"),
            ({"a": {}, "b": {}, "condition": {"class_labels": [7]}}, "classes in 0..3"),
            ({"a": {"weights": "best"}, "b": {}}, "weights must be 'ema' or 'raw'"),
        ]
        for body, message in bad:
            status, _, data = call(srv.url, "POST", "/api/ab/experiments", body)
            assert status == 400 and message in data["error"], body
        body = {"name": "ema vs raw", "a": {"weights": "ema"}, "b": {"weights": "raw", "steps": 2}}
        status, _, exp = call(srv.url, "POST", "/api/ab/experiments", body)
        assert status == 201 and exp["condition"] == {"class_labels": [0, 1, 2, 3]}
        assert call(srv.url, "POST", "/api/ab/pairs", {"experiment": 99})[0] == 404
        assert call(srv.url, "POST", "/api/ab/pairs", {"experiment": "1"})[0] == 400
        ema = dl.Pipeline.from_run(runs["class"])
        raw = dl.Pipeline.from_run(runs["class"], weights="raw")
        for choice in ("left", "right", "left", "tie", "both_bad"):
            status, _, pair = call(srv.url, "POST", "/api/ab/pairs", {"experiment": exp["id"]})
            assert status == 201
            left = np.asarray(Image.open(io.BytesIO(call(srv.url, "GET", pair["left"])[2])))
            label, seed = pair["condition"]["class_labels"], pair["seed"]
            a = make_grid(ema(1, label, seed=seed, progress=False), 1, padding=0)
            b = make_grid(raw(1, label, seed=seed, steps=2, progress=False), 1, padding=0)
            a_left = np.array_equal(left, np.asarray(a))
            assert a_left or np.array_equal(left, np.asarray(b))
            status, _, vote = call(
                srv.url, "POST", "/api/ab/votes", {"pair": pair["pair"], "choice": choice}
            )
            expected = {"left": "a" if a_left else "b", "right": "b" if a_left else "a"}
            assert status == 201 and vote["winner"] == expected.get(choice, choice)
        status, _, data = call(
            srv.url, "POST", "/api/ab/votes", {"pair": pair["pair"], "choice": "left"}
        )
        assert status == 409 and "already has a vote" in data["error"]
        for body in ({"pair": pair["pair"], "choice": "up"}, {"pair": 1}, {"pair": "x" * 5}):
            assert call(srv.url, "POST", "/api/ab/votes", body)[0] in (400, 404)
        ranking = call(srv.url, "GET", "/api/ab/ranking")[2]
        assert ranking["votes"] == 5 and len(ranking["configs"]) == 2
        csv_text = call(srv.url, "GET", "/api/ab/ranking.csv")[2].decode()
        assert (
            csv_text.splitlines()[0].startswith("rank,label,score")
            and len(csv_text.splitlines()) == 3
        )
        assert call(srv.url, "GET", "/api/ab/ranking?experiment=x")[0] == 400
    finally:
        srv.stop()
    with sqlite3.connect(tmp_path / "ab.sqlite") as db:  # on disk, without the server
        assert db.execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 5
    srv = start(runs["class"], data_dir=tmp_path)
    try:
        assert call(srv.url, "GET", "/api/ab/ranking")[2] == ranking
    finally:
        srv.stop()


def test_sweep_tables_and_plots_are_served(runs, tmp_path):
    folder = runs["class"] / "sweep"
    folder.mkdir(exist_ok=True)
    (folder / "sweep.csv").write_text("sampler,steps,fid\nddim,4,12.5\n")
    (folder / "sweep.md").write_text("| sampler |\n")
    Image.new("L", (4, 4)).save(folder / "sweep_nfe.png")
    srv = start(runs["class"], data_dir=tmp_path)
    try:
        sweeps = call(srv.url, "GET", "/api/sweeps")[2]["sweeps"]
        assert sweeps[0]["rows"] == [{"sampler": "ddim", "steps": "4", "fid": "12.5"}]
        assert sweeps[0]["plots"] == ["/api/sweeps/sweep/sweep_nfe.png"]
        assert call(srv.url, "GET", "/api/sweeps/sweep/sweep.md")[2] == b"| sampler |\n"
        assert call(srv.url, "GET", "/api/sweeps/sweep/config.yaml")[0] == 404
    finally:
        srv.stop()


def test_the_loop_stays_responsive_while_a_batch_samples(runs, tmp_path):
    srv = start(runs["class"], data_dir=tmp_path)
    try:
        job = call(srv.url, "POST", "/api/jobs", {"n": 4, "class_labels": 0, "steps": 1000})[2]
        while call(srv.url, "GET", f"/api/jobs/{job['id']}")[2]["step"] < 2:
            time.sleep(0.02)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            _alive(srv.url)
            times.append(time.perf_counter() - t0)
        assert np.median(times) < 0.5  # answered between steps, not after the batch
        call(srv.url, "DELETE", f"/api/jobs/{job['id']}")
    finally:
        srv.stop()


def test_two_clients_at_once_each_get_their_own_images(server, runs):
    pipe = dl.Pipeline.from_run(runs["class"])
    results = {}

    def client(label):
        results[label] = call(
            server.url, "POST", "/generate", {"n": 1, "class_labels": label, "seed": label}
        )[2]

    threads = [threading.Thread(target=client, args=(c,)) for c in (0, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for label, data in results.items():
        expected = make_grid(pipe(1, label, seed=label, progress=False))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(expected))
    assert torch.get_num_threads() >= 1


def test_ab_lora_scales_compare_the_adapter_at_two_strengths(runs, tmp_path):
    from difflab.finetune import add_lora, save_lora

    base = dl.Pipeline.from_run(runs["class"])
    add_lora(base.model, rank=2)
    with torch.no_grad():  # a non-zero adapter (lora_up starts at zero)
        for name, p in base.model.named_parameters():
            if "lora_up" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    save_lora(base.model, tmp_path / "adapter.safetensors")
    pipe = dl.Pipeline.from_run(runs["class"])
    pipe.load_lora(tmp_path / "adapter.safetensors", scale=0.7)
    from difflab.web import WebServer, create_app

    srv = WebServer(create_app(pipe, data_dir=tmp_path / "web"))
    try:
        body = {"a": {"lora_scale": 0.0}, "b": {"lora_scale": 1.0}}
        exp = call(srv.url, "POST", "/api/ab/experiments", body)[2]
        pair = call(srv.url, "POST", "/api/ab/pairs", {"experiment": exp["id"]})[2]
        label, seed = pair["condition"]["class_labels"], pair["seed"]
        plain = dl.Pipeline.from_run(runs["class"])  # scale 0 = the base network exactly
        zero = np.asarray(make_grid(plain(1, label, seed=seed, progress=False), 1, padding=0))
        sides = [np.asarray(Image.open(io.BytesIO(call(srv.url, "GET", pair[s])[2])))
                 for s in ("left", "right")]  # fmt: skip
        assert sum(np.array_equal(side, zero) for side in sides) == 1
        # the loaded strength is back afterwards: /generate equals the 0.7 pipeline
        again = dl.Pipeline.from_run(runs["class"])
        again.load_lora(tmp_path / "adapter.safetensors", scale=0.7)
        expected = make_grid(again(1, 0, seed=1, progress=False))
        data = call(srv.url, "POST", "/generate", {"n": 1, "class_labels": 0, "seed": 1})[2]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(expected))
    finally:
        srv.stop()


def test_ab_compares_two_runs_named_at_start(runs, tmp_path):
    """difflab serve RUN --compare OTHER: a side with "run": OTHER draws from the other run
    (same seed and condition); a run the server was not started with is refused."""
    import shutil

    other = tmp_path / "other"  # the same run with its two weight files swapped
    shutil.copytree(runs["class"], other, ignore=shutil.ignore_patterns("web", "samples"))
    (other / "ema.safetensors").replace(other / "tmp.safetensors")
    (other / "model.safetensors").replace(other / "ema.safetensors")
    (other / "tmp.safetensors").replace(other / "model.safetensors")
    from difflab.web import WebServer, create_app

    pipe = dl.Pipeline.from_run(runs["class"])
    srv = WebServer(create_app(pipe, data_dir=tmp_path / "web", compare=[other]))
    try:
        status, _, data = call(srv.url, "POST", "/api/ab/experiments",
                               {"a": {}, "b": {"run": "/etc"}})  # fmt: skip
        assert status == 400 and "not one this server compares" in data["error"]
        body = {"name": "two runs", "a": {}, "b": {"run": str(other)}}
        status, _, exp = call(srv.url, "POST", "/api/ab/experiments", body)
        assert status == 201
        pair = call(srv.url, "POST", "/api/ab/pairs", {"experiment": exp["id"]})[2]
        label, seed = pair["condition"]["class_labels"], pair["seed"]
        mine = np.asarray(make_grid(pipe(1, label, seed=seed, progress=False), 1, padding=0))
        theirs_pipe = dl.Pipeline.from_run(other)
        theirs = make_grid(theirs_pipe(1, label, seed=seed, progress=False), 1, padding=0)
        sides = [np.asarray(Image.open(io.BytesIO(call(srv.url, "GET", pair[s])[2])))
                 for s in ("left", "right")]  # fmt: skip
        assert sum(np.array_equal(s, mine) for s in sides) == 1
        assert sum(np.array_equal(s, np.asarray(theirs)) for s in sides) == 1
    finally:
        srv.stop()
