import pytest
from web_helpers import class_run, start, text_run


@pytest.fixture(scope="package")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    return {"class": class_run(root), "text": text_run(root)}


@pytest.fixture(scope="module")
def server(runs):
    srv = start(runs["class"], max_n=8)
    yield srv
    srv.stop()
