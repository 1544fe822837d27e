"""Whole runs converted to and from other tools' files: a difflab run exported as a diffusers
folder, an original single file or a kohya LoRA (``convert.export``), and a Stable Diffusion
checkpoint imported as a difflab base run for fine-tuning (``convert.sd_import``).

This layer sits above ``pipeline`` and ``train``, which it uses to read and write runs; the
format-only key maps and readers it builds on are ``difflab.interop``'s, which never import
this package.
"""

from __future__ import annotations

from .export import check_exportable, export_diffusers, export_kohya_lora, export_single_file
from .sd_import import import_stable_diffusion

__all__ = [
    "check_exportable",
    "export_diffusers",
    "export_kohya_lora",
    "export_single_file",
    "import_stable_diffusion",
]
