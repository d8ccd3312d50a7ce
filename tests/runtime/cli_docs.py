"""The checked-in help texts of the CLI (docs/cli/<command>.txt) and the examples in them.

Regenerate after changing a command: `python -m tests.runtime.cli_docs` (from the repository root,
with camrt-exporters importable so that `camrt export` is included).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from click.testing import CliRunner

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli"
GROUP = "camrt"


def help_texts() -> dict[str, str]:
    """{"camrt": the group's --help, command: its --help} for every command the CLI lists."""
    from camrt.cli import build_cli

    cli = build_cli()
    runner = CliRunner()
    texts = {GROUP: runner.invoke(cli, ["--help"], catch_exceptions=False).stdout}
    for name in cli.list_commands(None):
        texts[name] = runner.invoke(cli, [name, "--help"], catch_exceptions=False).stdout
    return texts


def examples(text: str) -> list[str]:
    """The command lines of a help text's "Examples:" section."""
    section = text.split("Examples:", 1)[1] if "Examples:" in text else ""
    return [line.strip() for line in section.splitlines() if re.search(r"(^|\| )camrt\b", line.strip())]


def main() -> None:
    from camrt.plugins import ensure_registered, get_plugin_manager

    ensure_registered(get_plugin_manager(), "camrt_exporters.plugin")
    DOCS.mkdir(parents=True, exist_ok=True)
    for name, text in help_texts().items():
        (DOCS / f"{name}.txt").write_text(text)
        print(f"wrote {DOCS / f'{name}.txt'}", file=sys.stderr)


if __name__ == "__main__":
    main()
