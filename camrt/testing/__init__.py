"""Placeholder; filled in below."""

from pathlib import Path

TINY_FOLDER = Path(__file__).parent
