"""Registries of methods, metrics, renderers and target kinds, built from the `register_methods`,
`register_metrics`, `register_renderers` and `register_targets` hooks.

Each plugin's hook implementation is called on its own so that errors name the plugin. A plugin
whose hook raises, or registers something invalid (a duplicate name or alias, a class that is not
a `Method` or `Metric`), is left out as a whole and its failure is recorded with its name in
`camrt.plugins.load_failures` (listed by `camrt plugins`, and quoted when a missing method is asked
for); the other plugins still register. Nothing is dropped silently.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pluggy

from .. import plugins
from ..errors import PluginError, UsageError
from ..methods.base import Method
from ..metrics.base import Metric


def _call_each(pm: pluggy.PluginManager, hook_name: str, make_register: Callable[[str], Callable[..., None]],
               forget: Callable[[str], None]) -> dict[str, str]:
    """Call every implementation of `hook_name`, one by one, with a register bound to its plugin.

    A plugin that fails is rolled back with `forget(plugin)`; returns plugin name -> message."""
    failures: dict[str, str] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():  # registration order: built-ins first, so a clash blames the newcomer
        kwargs = {"register": make_register(impl.plugin_name)}
        try:
            impl.function(*[kwargs[arg] for arg in impl.argnames])
        except Exception as exc:  # PluginError from the registry, or a plugin's own bug
            message = str(exc) if isinstance(exc, PluginError) else (
                f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc!r}")
            forget(impl.plugin_name)
            failures[impl.plugin_name] = message
            plugins.load_failures[impl.plugin_name] = message
    return failures


def _failures_text(failures: dict[str, str]) -> str:
    return f"; plugins that failed to register: {'; '.join(failures.values())}" if failures else ""


class ClassRegistry:
    """Plugin classes of one kind (methods, metrics) by name and alias (case-insensitive).

    Subclasses set `kind` (the word used in messages) and `base` (the class every entry subclasses).
    """

    kind: str = "class"
    base: type = object

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}  # canonical name -> class
        self._plugins: dict[str, str] = {}  # canonical name -> plugin name
        self._lookup: dict[str, str] = {}  # name or alias (lower case) -> canonical name
        #: Plugins left out: plugin name -> why.
        self.failures: dict[str, str] = {}

    def register(self, cls: Any, plugin: str = "<direct>") -> None:
        kind = self.kind
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not a subclass of camrt {self.base.__name__}")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise PluginError(f"plugin {plugin!r} registered {kind} class {cls.__name__} that does not implement {missing}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise PluginError(f"plugin {plugin!r} registered {kind} class {cls.__name__} without a `name`")
        keys = [name.lower(), *(alias.lower() for alias in cls.aliases)]
        for key in keys:
            owner = self._lookup.get(key)
            if owner is not None or keys.count(key) > 1:
                by = f" by plugin {self._plugins[owner]!r} ({kind} {owner!r})" if owner else " twice by the same class"
                raise PluginError(
                    f"plugin {plugin!r}: {kind} name {key!r} is already registered{by}; "
                    f"registered {kind}s: {self.listing()}"
                )
        self._classes[name] = cls
        self._plugins[name] = plugin
        for key in keys:
            self._lookup[key] = name

    def forget_plugin(self, plugin: str) -> None:
        """Remove every class `plugin` registered."""
        for name in [n for n, owner in self._plugins.items() if owner == plugin]:
            del self._classes[name], self._plugins[name]
            self._lookup = {key: canonical for key, canonical in self._lookup.items() if canonical != name}

    def get(self, name: str) -> type:
        canonical = self._lookup.get(name.lower())
        if canonical is None:
            raise PluginError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {self.listing()}"
                              f"{_failures_text(self.failures)}")
        return self._classes[canonical]

    def plugin_of(self, name: str) -> str:
        return self._plugins[self.get(name).name]

    def names(self) -> list[str]:
        return sorted(self._classes)

    def listing(self) -> str:
        if not self._classes:
            return "(none)"
        parts = []
        for name in self.names():
            aliases = self._classes[name].aliases
            parts.append(f"{name} (aliases: {', '.join(aliases)})" if aliases else name)
        return ", ".join(parts)

    def __iter__(self) -> Iterator[type]:
        return (self._classes[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._classes)


class MethodRegistry(ClassRegistry):
    """Method classes (`camrt.methods.base.Method`) by name and alias."""

    kind = "method"
    base = Method


class MetricRegistry(ClassRegistry):
    """Metric classes (`camrt.metrics.base.Metric`) by name and alias."""

    kind = "metric"
    base = Metric


def _build_class_registry(registry: ClassRegistry, hook_name: str, pm: pluggy.PluginManager | None) -> ClassRegistry:
    if pm is None:
        pm = plugins.get_plugin_manager()
    registry.failures = _call_each(pm, hook_name, lambda plugin: lambda cls: registry.register(cls, plugin),
                                   registry.forget_plugin)
    return registry


def build_method_registry(pm: pluggy.PluginManager | None = None) -> MethodRegistry:
    return _build_class_registry(MethodRegistry(), "register_methods", pm)


def build_metric_registry(pm: pluggy.PluginManager | None = None) -> MetricRegistry:
    return _build_class_registry(MetricRegistry(), "register_metrics", pm)


#: write(path, heatmap [H, W] float32 in [0, 1], image HWC uint8 RGB or None, options dict) -> None
WriteFunction = Callable[[str, Any, Any, dict], None]


@dataclass(frozen=True)
class Renderer:
    name: str
    write: WriteFunction
    #: File name suffix after the input's stem, e.g. ".overlay.png".
    suffix: str
    #: Key of the written path in the JSON record (e.g. "overlay"); every path is also under "outputs".
    field: str
    plugin: str


class _NamedRegistry:
    """Entries (each with a `plugin`) by lower-case name: the registries of things that are not
    classes. Subclasses set `entry` and `entries` (the words of the messages)."""

    entry: ClassVar[str]
    entries: ClassVar[str]
    #: Names no plugin may take: name -> who holds it.
    reserved: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self._entries: dict[str, Any] = {}
        #: Plugins left out: plugin name -> why.
        self.failures: dict[str, str] = {}

    def forget_plugin(self, plugin: str) -> None:
        """Remove every entry `plugin` registered."""
        self._entries = {key: e for key, e in self._entries.items() if e.plugin != plugin}

    def _add(self, key: str, entry: Any, plugin: str) -> None:
        if key in self._entries or key in self.reserved:
            owner = self._entries[key].plugin if key in self._entries else self.reserved[key]
            raise PluginError(f"plugin {plugin!r}: {self.entry} {key!r} is already registered by plugin {owner!r}; "
                              f"registered {self.entries}: {', '.join(self.names())}")
        self._entries[key] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Any]:
        return (self._entries[name] for name in self.names())


class RendererRegistry(_NamedRegistry):
    entry, entries = "renderer", "renderers"

    def register(self, name: str, write: WriteFunction, *, suffix: str | None = None,
                 field: str | None = None, plugin: str = "<direct>") -> None:
        if not isinstance(name, str) or not name or not callable(write):
            raise PluginError(f"plugin {plugin!r} registered an invalid renderer {name!r} ({write!r})")
        key = name.lower()
        self._add(key, Renderer(key, write, suffix or f".{key}", field or key, plugin), plugin)

    def get(self, name: str) -> Renderer:
        renderer = self._entries.get(name.lower())
        if renderer is None:
            raise PluginError(f"unknown output format {name!r}; registered renderers: {', '.join(self.names()) or '(none)'}"
                              f"{_failures_text(self.failures)}")
        return renderer


def build_renderer_registry(pm: pluggy.PluginManager | None = None) -> RendererRegistry:
    if pm is None:
        pm = plugins.get_plugin_manager()
    registry = RendererRegistry()

    def make_register(plugin: str):
        def register(name, write, *, suffix=None, field=None):
            registry.register(name, write, suffix=suffix, field=field, plugin=plugin)
        return register

    registry.failures = _call_each(pm, "register_renderers", make_register, registry.forget_plugin)
    return registry


#: parse(value after "KIND:", **options) -> camrt.targets.TargetRequest
ParseFunction = Callable[..., Any]


@dataclass(frozen=True)
class TargetKind:
    kind: str
    parse: ParseFunction
    #: The `camrt explain` target options it takes (e.g. "region").
    options: tuple[str, ...]
    plugin: str


class TargetRegistry(_NamedRegistry):
    """Kinds of ``--target KIND:VALUE`` (the `register_targets` hook) by lower-case name."""

    entry, entries = "target kind", "kinds"
    reserved = {"topk": "camrt.targets", "above": "camrt.targets"}

    def register(self, kind: str, parse: ParseFunction, *, options: Sequence[str] = (), plugin: str = "<direct>") -> None:
        if not isinstance(kind, str) or not kind.isidentifier() or not callable(parse):
            raise PluginError(f"plugin {plugin!r} registered an invalid target kind {kind!r} ({parse!r}); give a "
                              "word and a parse function")
        key = kind.lower()
        self._add(key, TargetKind(key, parse, tuple(options), plugin), plugin)

    def get(self, kind: str) -> TargetKind:
        found = self._entries.get(kind.lower())
        if found is None:
            raise UsageError(f"--target {kind}:...: unknown target kind {kind!r}; registered kinds: "
                             f"{', '.join(self.names()) or '(none)'} (and N, N,M,..., top1, topk:K, above:T){_failures_text(self.failures)}")
        return found


def build_target_registry(pm: pluggy.PluginManager | None = None) -> TargetRegistry:
    if pm is None:
        pm = plugins.get_plugin_manager()
    registry = TargetRegistry()
    registry.failures = _call_each(
        pm, "register_targets",
        lambda plugin: lambda kind, parse, options=(): registry.register(kind, parse, options=options, plugin=plugin),
        registry.forget_plugin)
    return registry
