"""camrt-exporters: turn models into camrt contract files (forward + gradient subgraphs)."""

__version__ = "0.1.0"
