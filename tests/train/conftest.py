"""The training tests share one difflab cache (the digits classifier that autoencoder runs
on the digits score their reconstruction FID with), never the user's."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    """``$DIFFLAB_CACHE`` in the session's temp folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp_path_factory.getbasetemp() / "difflab_cache"))
        yield
