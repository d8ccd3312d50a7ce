"""`camrt plugins`: which plugins loaded, where from, and which failed."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import CONTEXT_SETTINGS


def describe_plugins(pm: Any = None) -> dict[str, Any]:
    """{"plugins": [{name, origin, module, hooks}], "failures": {name: message}} for `pm`.

    The method, metric and renderer registries are built first, so that plugins failing in their
    `register_*` hooks are among the failures."""
    from .. import plugins
    from ..plugins.registry import build_method_registry, build_metric_registry, build_renderer_registry

    pm = pm or plugins.get_plugin_manager()
    build_method_registry(pm)
    build_metric_registry(pm)
    build_renderer_registry(pm)
    listed = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:  # a blocked name
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        listed.append({
            "name": name,
            "origin": plugins.origins.get(name, "registered at run time"),
            "module": getattr(plugin, "__name__", type(plugin).__module__),
            "hooks": hooks,
        })
    return {"plugins": listed, "failures": dict(sorted(plugins.load_failures.items()))}


PLUGINS_EPILOG = """\b
Examples:
  camrt plugins
  camrt plugins --json
"""


def build_plugins_command() -> click.Command:
    @click.command("plugins", context_settings=CONTEXT_SETTINGS, epilog=PLUGINS_EPILOG)
    @click.option("--json", "as_json", is_flag=True, help="A JSON object instead of a table.")
    def plugins_command(as_json: bool) -> None:
        """List the loaded plugins (built-in, entry points, CAMRT_PLUGINS) and the ones that failed."""
        described = describe_plugins()
        if as_json:
            click.echo(json.dumps(described, indent=2))
            return
        rows = [["NAME", "ORIGIN", "HOOKS"]] + [
            [p["name"], p["origin"], ", ".join(p["hooks"]) or "-"] for p in described["plugins"]]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        click.echo("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows))
        if described["failures"]:
            click.echo("\nfailed to load:")
            for message in described["failures"].values():
                click.echo(f"  {message}")

    return plugins_command
