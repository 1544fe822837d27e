"""Interoperability with other libraries' file formats (diffusers folders, checkpoints).

Each submodule reads one foreign format into difflab's own objects (schedules, sampling
plans, models) with mappings written here, never by importing the other library; the other
library serves only as a reference in the tests.
"""
