"""The plugin manager: built-in plugins, entry points of group ``camrt``, listed modules, blocking.

Only these are ever imported as plugins: the built-in modules below, the entry points of group
``camrt`` of installed distributions, and modules named explicitly (``CAMRT_PLUGINS`` or
`create_plugin_manager(modules=...)`). Nothing is imported because of a file name, a folder, or
anything a model file says. A plugin that fails to import or to register is left out, recorded
with its name in `load_failures` (shown by ``camrt plugins``), and the others still load.

Environment:
- ``CAMRT_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry points (built-ins and listed modules still load).
- ``CAMRT_PLUGINS=module,...`` loads these modules as plugins, by import name.
- ``CAMRT_BLOCK_PLUGINS=a,b`` blocks the named plugins (entry-point names or module names).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from .. import hookspecs
from ..errors import PluginError

ENTRY_POINT_GROUP = "camrt"
PLUGINS_ENV = "CAMRT_PLUGINS"
#: Built-in plugins, registered exactly like third-party ones.
DEFAULT_PLUGINS = (
    "camrt.plugins.fallbacks",
    "camrt.imaging.render",
    "camrt.methods.gradcam",
    "camrt.methods.gradcam_plusplus",
    "camrt.methods.xgradcam",
    "camrt.methods.hirescam",
    "camrt.methods.gradcam_elementwise",
    "camrt.methods.layercam",
    "camrt.methods.eigencam",
    "camrt.methods.eigengradcam",
    "camrt.methods.saliency",
    "camrt.methods.guided_backprop",
    "camrt.methods.deconvnet",
    "camrt.methods.guided_gradcam",
    "camrt.methods.scorecam",
    "camrt.methods.sscam",
    "camrt.methods.iscam",
    "camrt.methods.ablationcam",
    "camrt.methods.smoothgrad",
    "camrt.methods.integrated_gradients",
    "camrt.methods.cam",
    "camrt.methods.fullgrad",
    "camrt.methods.smooth_gradcam_plusplus",
    "camrt.methods.attention_rollout",
    "camrt.methods.generic_attention",
    "camrt.methods.legrad",
    "camrt.methods.vit_reciprocam",
    "camrt.methods.drise",
    "camrt.metrics.deletion",
    "camrt.metrics.confidence",
    "camrt.metrics.road",
    "camrt.metrics.pointing",
    "camrt.metrics.randomization",
    "camrt.seeds.plugin",
)
ORIGIN_BUILTIN = "built-in"
ORIGIN_ENTRY_POINT = "entry point"
ORIGIN_LISTED = f"listed ({PLUGINS_ENV})"

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
#: Plugins that failed to load or register: name -> message. Reported by `camrt plugins`.
load_failures: dict[str, str] = {}
#: How each plugin of the process-wide manager came in: name -> one of the ORIGIN_* values.
origins: dict[str, str] = {}


def _env_list(name: str) -> list[str]:
    return list(dict.fromkeys(item.strip() for item in os.environ.get(name, "").split(",") if item.strip()))


def _declarer(pm: pluggy.PluginManager) -> Callable[[Any], None]:
    """The `declare` of the `declare_hooks` hook: adds a hookspec module to `pm` once."""
    declared: list[Any] = []

    def declare(namespace: Any) -> None:
        if any(namespace is done for done in declared):
            return
        pm.add_hookspecs(namespace)
        declared.append(namespace)

    return declare


def _undeclared_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """The hooks `plugin` implements that no hookspec declares (optional hooks excepted)."""
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()
                  if not caller.has_spec()
                  and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()))


def _record_failure(name: str, described: str, problem: str) -> None:
    load_failures[name] = f"plugin {name!r} ({described}) failed to load: {problem}"
    origins.pop(name, None)


def _register_third_party(pm: pluggy.PluginManager, name: str, load, described: str, origin: str) -> bool:
    """Import (via `load`) and register one plugin; a failure is recorded and leaves no trace."""
    plugin = None
    try:
        plugin = load()
        pm.register(plugin, name=name)  # runs its declare_hooks, if any
    except Exception as exc:  # a broken plugin must not take the others down
        if plugin is not None and pm.is_registered(plugin):
            pm.unregister(plugin)
        _record_failure(name, described, repr(exc))
        return False
    origins[name] = origin
    return True


def _leave_out_undeclared(pm: pluggy.PluginManager, described: dict[str, str]) -> None:
    """Unregister each of the `described` plugins (name -> where from) that implements a hook no
    plugin declares. Checked once all plugins are in, so that a hook declared by a plugin loaded
    after its implementers (entry points come in no set order) counts."""
    for name, where in described.items():
        plugin = pm.get_plugin(name)
        undeclared = _undeclared_hooks(pm, plugin)
        if undeclared:
            pm.unregister(plugin)
            _record_failure(name, where, f"it implements {', '.join(undeclared)}, which no loaded plugin declares "
                            "(a misspelt hook name, or the plugin declaring it is not installed or is blocked)")


def create_plugin_manager(*, load_entrypoints: bool | None = None, blocked: Iterable[str] | None = None,
                          modules: Iterable[str] | None = None) -> pluggy.PluginManager:
    """A fresh manager with the built-ins, the entry-point plugins (unless disabled) and the
    listed `modules` (default: $CAMRT_PLUGINS)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.hook.declare_hooks.call_historic(kwargs={"declare": _declarer(pm)})
    blocked = set(_env_list("CAMRT_BLOCK_PLUGINS") if blocked is None else blocked)
    for name in blocked:
        pm.set_blocked(name)
    for module_name in DEFAULT_PLUGINS:
        if module_name not in blocked:
            pm.register(importlib.import_module(module_name), name=module_name)
            origins[module_name] = ORIGIN_BUILTIN
    third_party: dict[str, str] = {}  # registered name -> where it came from
    if load_entrypoints is None:
        load_entrypoints = os.environ.get("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    if load_entrypoints:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            # Blocked by entry-point name or by module name: checked before loading, so a blocked
            # plugin's code never runs.
            if {ep.name, ep.module} & blocked or pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
                continue
            if _register_third_party(pm, ep.name, ep.load, ep.value, ORIGIN_ENTRY_POINT):
                third_party[ep.name] = ep.value
    for module_name in (_env_list(PLUGINS_ENV) if modules is None else modules):
        if module_name in blocked or pm.get_plugin(module_name) is not None:
            continue
        if _register_third_party(pm, module_name, lambda m=module_name: importlib.import_module(m), "module",
                                 ORIGIN_LISTED):
            third_party[module_name] = "module"
    _leave_out_undeclared(pm, third_party)
    pm.check_pending()
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, built once on first use (nothing is loaded at import time)."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = create_plugin_manager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests, or after changing the environment)."""
    global _manager
    with _lock:
        _manager = None
        load_failures.clear()
        origins.clear()


def ensure_registered(pm: pluggy.PluginManager, module_name: str) -> None:
    """Register `module_name` unless it (or a plugin of that object) is already registered or blocked."""
    module = importlib.import_module(module_name)
    if pm.is_registered(module) or pm.is_blocked(module_name):
        return
    try:
        pm.register(module, name=module_name)
    except ValueError as exc:
        raise PluginError(f"cannot register plugin {module_name!r}: {exc}") from exc
