"""The plugin manager: built-in plugins, entry points of group ``camrt``, blocking and disabling.

Environment:
- ``CAMRT_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry points (built-ins still load).
- ``CAMRT_BLOCK_PLUGINS=a,b`` blocks the named plugins (entry-point names or module names).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "camrt"
#: Built-in plugins, registered exactly like third-party ones.
DEFAULT_PLUGINS = (
    "camrt.builtin_hooks",
    "camrt.render",
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
    "camrt.methods.smooth_gradcam_plusplus",
)

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
#: Plugins that failed to load: name -> message. Reported by `camrt plugins`.
load_failures: dict[str, str] = {}


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


def create_plugin_manager(*, load_entrypoints: bool | None = None, blocked: set[str] | None = None) -> pluggy.PluginManager:
    """A fresh manager with the built-ins and (unless disabled) the entry-point plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = _env_list("CAMRT_BLOCK_PLUGINS") if blocked is None else blocked
    for name in blocked:
        pm.set_blocked(name)
    for module_name in DEFAULT_PLUGINS:
        if module_name not in blocked:
            pm.register(importlib.import_module(module_name), name=module_name)
    if load_entrypoints is None:
        load_entrypoints = os.environ.get("CAMRT_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    if load_entrypoints:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            # Blocked by entry-point name or by module name: checked before loading, so a blocked
            # plugin's code never runs.
            if {ep.name, ep.module} & blocked or pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                load_failures[ep.name] = f"plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}"
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


def ensure_registered(pm: pluggy.PluginManager, module_name: str) -> None:
    """Register `module_name` unless it (or a plugin of that object) is already registered or blocked."""
    module = importlib.import_module(module_name)
    if pm.is_registered(module) or pm.is_blocked(module_name):
        return
    try:
        pm.register(module, name=module_name)
    except ValueError as exc:
        raise PluginError(f"cannot register plugin {module_name!r}: {exc}") from exc
