"""The eval tests share one difflab cache (digits classifier, reference features)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    """``$DIFFLAB_CACHE`` in the session's temp folder, never the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.getbasetemp() / "difflab_cache"  # shared by the eval tests
        mp.setenv("DIFFLAB_CACHE", str(cache))
        yield
