"""difflab's version string: the bottom layer, so any module may name it without importing
the ``difflab`` facade."""

__version__ = "0.1.0"
