"""Shared fixtures of the Stable Diffusion fine-tuning tests, built once per session: a tiny
SD1 and a tiny SDXL pipeline (random weights) saved as diffusers folders, and four captioned
images to fine-tune on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))

CAPTIONS = ["a red cat", "a blue house", "a cat in the tree", "the red sky"]


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny SD1 pipeline (seed 0) as a diffusers folder."""
    pytest.importorskip("diffusers")
    from sd_helpers import tiny_sd1_pipeline

    folder = tmp_path_factory.mktemp("sd1") / "sd"
    tiny_sd1_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def xl_pipe():
    """A tiny SDXL pipeline (seed 0); tests must not change it."""
    pytest.importorskip("diffusers")
    from sd_helpers import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="session")
def xl_folder(xl_pipe, tmp_path_factory) -> Path:
    """``xl_pipe`` as a diffusers folder."""
    folder = tmp_path_factory.mktemp("sdxl") / "sdxl"
    xl_pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def captions() -> list[str]:
    """The captions of ``data``."""
    return list(CAPTIONS)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """Four captioned images (``CAPTIONS``)."""
    from train_helpers import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("data") / "images", CAPTIONS)
