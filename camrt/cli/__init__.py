"""The `camrt` command line: `explain`, `eval`, `metrics`, `methods`, `inspect`, `plugins`, plus
commands added by plugins.

Plugins add commands through the `register_commands` hook (camrt-exporters adds `camrt export`);
they are asked only when a command name is not a built-in one, or when commands are listed.
camrt errors become one message on stderr and the exit code of `camrt.errors.ExitCode`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from .. import __version__
from ..errors import CamrtError, ExitCode
from .common import CONTEXT_SETTINGS, CamrtCommandError, warn
from .evaluate import build_eval_command, build_metrics_command
from .explain import explain_command
from .inspect import inspect_command, methods_command
from .plugins import build_plugins_command
from .ray_explain import build_ray_explain_command


class CamrtGroup(click.Group):
    """A click group that asks the plugins for their commands once, when first needed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._builtin = set()
        self._plugin_commands_loaded = False

    def add_builtin(self, command: click.Command) -> None:
        self.add_command(command)
        self._builtin.add(command.name)

    def load_plugin_commands(self) -> None:
        if self._plugin_commands_loaded:
            return
        self._plugin_commands_loaded = True
        from ..plugins import get_plugin_manager, load_failures

        pm = get_plugin_manager()
        for impl in pm.hook.register_commands.get_hookimpls():
            try:
                impl.function(*[{"cli": self}[arg] for arg in impl.argnames])
            except Exception as exc:  # a broken plugin must not take the CLI down; it is reported
                message = f"plugin {impl.plugin_name!r} failed to add its commands: {exc!r}"
                load_failures[impl.plugin_name] = message
                warn(message)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._builtin:
            self.load_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CamrtError as exc:
            raise CamrtCommandError(exc) from None


# --- the group ----------------------------------------------------------------------------------


GROUP_EPILOG = """\b
Examples:
  camrt --version
  camrt explain model.camrt.onnx photos/ -o out/
  camrt inspect --help
"""


def build_cli() -> CamrtGroup:
    """A fresh `camrt` group (tests build their own; `cli` below is the process-wide one)."""

    @click.group("camrt", cls=CamrtGroup, context_settings=CONTEXT_SETTINGS, epilog=GROUP_EPILOG)
    @click.version_option(__version__, "--version", prog_name="camrt", message="%(prog)s %(version)s")
    def group() -> None:
        """camrt: explain image models where they are deployed (onnxruntime, no PyTorch).

        Exit codes: 0 all inputs ok, 1 some inputs failed, 2 usage error, 3 model or contract error,
        4 internal error (a bug: the traceback is printed).
        """

    for command in (explain_command, methods_command, inspect_command, build_eval_command(), build_metrics_command(),
                    build_plugins_command(), build_ray_explain_command()):
        group.add_builtin(command)
    return group


cli = build_cli()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `camrt ...`."""
    try:
        cli.main(args=argv, prog_name="camrt")
    except CamrtError as exc:  # raised outside a command (e.g. while loading plugins)
        click.echo(f"camrt: error: {exc}", err=True)
        sys.exit(int(exc.exit_code))
    except Exception:  # a bug (camrt's or a plugin's): its own exit code, never 1 ("some inputs failed")
        import traceback

        traceback.print_exc()
        click.echo("camrt: internal error (the traceback above); please report it", err=True)
        sys.exit(int(ExitCode.INTERNAL_ERROR))


if __name__ == "__main__":
    main()
