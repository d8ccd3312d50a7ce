"""What every camrt command shares: help settings and how a camrt error leaves the CLI."""

from __future__ import annotations

from typing import Any

import click

from ..errors import CamrtError

#: A fixed help width, so that the checked-in help texts (docs/cli/) do not depend on the terminal.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "terminal_width": 100, "max_content_width": 100}


class CamrtCommandError(click.ClickException):
    """A CamrtError on its way out of the CLI: one message, camrt's exit code."""

    def __init__(self, error: CamrtError):
        super().__init__(str(error))
        self.exit_code = int(error.exit_code)

    def show(self, file: Any = None) -> None:
        click.echo(f"camrt: error: {self.format_message()}", err=True)


def warn(message: str) -> None:
    """A `camrt: warning:` line on stderr."""
    click.echo(f"camrt: warning: {message}", err=True)


def table(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned text columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
