"""``difflab serve``: the HTTP API samples exactly what the Pipeline samples, and refuses bad
requests with a 400 that says why."""

from __future__ import annotations

import io
import json
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "train"))
from train_helpers import ToyData, tiny_config  # noqa: E402

import difflab as dl  # noqa: E402
from difflab.images import PNG_KEY, make_grid  # noqa: E402
from difflab.serve import REQUEST_FIELDS, make_server  # noqa: E402
from difflab.train import train  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    train(tiny_config(run, "train.max_steps=2"), dataset=ToyData(), progress=False)
    pipe = dl.Pipeline.from_run(run)
    srv = make_server(pipe, "127.0.0.1", 0, max_n=8, log=False)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    host, port = srv.server_address[:2]
    yield f"http://{host}:{port}", run
    srv.shutdown()
    srv.server_close()


def _post(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/generate", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_generate_returns_the_pipelines_grid_with_its_parameters(server):
    url, run = server
    body = {"n": 3, "class_labels": [0, 1, 2], "sampler": "ddim", "steps": 3, "seed": 5,
            "guidance_scale": 2.0, "guidance_rescale": 0.5, "guidance_interval": [0.1, 20],
            "eta": 0.2, "nrow": 3}  # fmt: skip
    status, headers, data = _post(url, body)
    assert status == 200 and headers["Content-Type"] == "image/png"
    png = Image.open(io.BytesIO(data))
    params = json.loads(png.text[PNG_KEY])
    assert params["class_labels"] == [0, 1, 2] and params["seed"] == 5 and params["steps"] == 3
    assert params["guidance_interval"] == [0.1, 20.0] and params["eta"] == 0.2
    assert json.loads(headers["X-Difflab-Params"])["sampler"] == "ddim"
    pipe = dl.Pipeline.from_run(run)
    kwargs = {k: v for k, v in body.items() if k != "nrow"}
    expected = make_grid(pipe(**kwargs, progress=False), 3)
    assert np.array_equal(np.asarray(png), np.asarray(expected))


@pytest.mark.parametrize(
    "body, message",
    [
        ({"n": 100}, "n must be an integer in 1..8"),
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"class_labels": [9]}, "class labels must lie in 0..3"),
        ({"sampler": "warp"}, "unknown sampler"),
        ({"steps": 0}, "steps must be an integer"),
        ({"guidance_interval": 5}, "guidance_interval must be [sigma_lo, sigma_hi]"),
        ({"guidance_interval": [5, 1]}, "sigma_lo < sigma_hi"),
        ({"eta": "x"}, "eta must be a number"),
        ({"negative_prompt": 3}, "negative_prompt must be a string"),
        ({"class_labels": 1, "negative_class": 4}, "class labels must lie in 0..3"),
        ({"apg": [1, 2]}, "apg must be an object of numbers"),
        ({"apg": {"beta": 1}}, "unknown APG option"),
        (b"not json", "not JSON"),
    ],
)
def test_bad_requests_get_400_with_the_reason(server, body, message):
    url, _ = server
    status, headers, data = _post(url, body)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert message in json.loads(data)["error"]


def test_info_page_and_unknown_paths(server):
    url, run = server
    with urllib.request.urlopen(url + "/info", timeout=30) as resp:
        info = json.loads(resp.read())
    assert info["num_classes"] == 4 and info["run"] == str(run) and "ddim" in info["samplers"]
    with urllib.request.urlopen(url + "/", timeout=30) as resp:
        page = resp.read().decode()
    assert "<form" in page and 'name="class_labels"' in page
    assert 'name="interval_lo"' in page and 'name="apg"' in page  # the refinements, as fields
    for field in ("guidance_interval", "apg"):  # ... posted under the API's own names
        assert f"body.{field} =" in page and field in REQUEST_FIELDS
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "/nothing", timeout=30)
    assert err.value.code == 404
