"""Interoperability with other diffusion tools: their file formats and parameter records,
read and written in difflab's own terms (one module per foreign tool or format)."""
