"""Conversions between difflab's files and other projects' checkpoint layouts (the original
CompVis/Stability Stable Diffusion checkpoints); each module owns one network's mapping and
knows nothing of training or sampling."""
