"""The hooks camrt-exporters declares; camrt's own hooks are in camrt/hookspecs.py.

The exporter's plugin module (camrt_exporters/plugin.py) declares this module through camrt's
`declare_hooks` hook when it is registered, so the runtime needs to know nothing of rule sets.
Plugins implement these hooks with `@camrt.hookimpl`, like camrt's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from camrt.hookspecs import hookspec

if TYPE_CHECKING:
    from .autodiff.reverse import RuleSet


@hookspec
def register_gradient_rules(register: Callable[["RuleSet"], None]) -> None:
    """Register backward-rule sets for the exporter: ``register(rule_set)``.

    ``rule_set`` is a ``camrt_exporters.RuleSet`` (a name, op type -> backward rule, and a base set
    supplying the rules it does not override). Called by the exporter only, never on the edge
    runtime; a name registered twice raises ``camrt.errors.PluginError``.
    """
