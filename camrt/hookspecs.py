"""Every hook camrt calls, typed and documented. Plugins implement them with `@camrt.hookimpl`.

A plugin package may declare hooks of its own through `declare_hooks` (camrt-exporters declares
``register_gradient_rules`` in camrt_exporters/hookspecs.py); the runtime knows none of them.

Hooks only register things; the work happens in plain classes that can be tested without pluggy.
Hooks are always called with keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

PROJECT = "camrt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(historic=True)
def declare_hooks(declare: Callable[[Any], None]) -> None:
    """Declare the hooks this plugin package owns: ``declare(hookspec_module)``.

    pytest's ``pytest_addhooks``: called for every plugin as it is registered (built-ins, entry
    points, listed modules, later registrations alike), before any plugin's implementations are
    checked against the specifications, so the order in which entry points load does not matter.
    ``hookspec_module`` holds functions marked with ``camrt.hookspecs.hookspec``; declaring the
    same module again is a no-op, a hook name declared by two modules leaves the second plugin
    out. A plugin implementing a hook that no loaded plugin declares is left out, named in
    ``camrt.plugins.load_failures``.
    """


@hookspec
def register_methods(register: Callable[..., None]) -> None:
    """Register explanation methods: ``register(MethodClass)``.

    Called once when the method registry is built. ``MethodClass`` subclasses
    ``camrt.methods.base.Method``. A plugin whose implementation raises or registers a duplicate
    name or alias is left out as a whole and recorded in ``camrt.plugins.load_failures``.
    """


@hookspec
def register_metrics(register: Callable[..., None]) -> None:
    """Register evaluation metrics for ``camrt eval``: ``register(MetricClass)``.

    Called once when the metric registry is built. ``MetricClass`` subclasses
    ``camrt.metrics.base.Metric`` (``evaluate(batch) -> one dict of results per image``); a
    duplicate name or alias raises ``PluginError``.
    """


@hookspec
def register_renderers(register: Callable[..., None]) -> None:
    """Register output formats: ``register(name, write_function, *, suffix=None, field=None)``.

    ``write_function(path, heatmap, image, options) -> None`` writes one file; the runtime
    makes the write atomic (it passes a temporary path and moves the file into place).
    ``heatmap`` is float32 [H, W] in [0, 1], ``image`` HWC uint8 RGB of the same size (or None),
    ``options`` a dict (e.g. ``alpha``). ``suffix`` follows the input's stem in the file name
    (default ``"." + name``); ``field`` is the JSON record key of the written path (default
    ``name``). A duplicate name leaves the plugin out, recorded in ``camrt.plugins.load_failures``.
    Called once when the renderer registry is built.
    """


@hookspec
def register_targets(register: Callable[..., None]) -> None:
    """Register kinds of target for ``--target KIND:VALUE``: ``register(kind, parse, *, options=())``.

    ``parse(value, **options) -> camrt.targets.TargetRequest`` turns the text after ``KIND:`` into
    a request (raise ``camrt.errors.UsageError`` for bad text); ``options`` names the target
    options of ``camrt explain`` it takes (``"region"``: ``--region``; ``box`` takes ``"box_iou"``,
    ``"box_format"``, ``"box_layout"``: ``--box-iou`` ...), passed when given. A request
    of a `camrt.seeds.targets.SeededTarget` (its seed made from the forward outputs) is run by the
    Explainer with one forward and one backward pass. The built-ins (``seg``, ``similar``, ``box``,
    in camrt/seeds/targets.py) register through this hook too; class targets (``N``, ``top1``,
    ``topk:K``) are not kinds. A duplicate kind leaves the plugin out, recorded in
    ``camrt.plugins.load_failures``. Called once when the target registry is built.
    """


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add subcommands to the ``camrt`` CLI (camrt-exporters adds ``camrt export``).

    Called once when the CLI group is built.
    """


@hookspec(firstresult=True)
def choose_target_layer(candidates: Sequence[str], framework: str) -> str | None:
    """Choose the layer to explain when the user names none, or return None to pass.

    ``candidates`` are layer names on the path to the score, in forward order; ``framework``
    is "torch" or "onnx". The first non-None result wins; the built-in fallback (trylast)
    takes the last candidate: the last tensor with spatial extent before the classifier.
    """


@hookspec(firstresult=True)
def choose_execution_providers(device: str, available: Sequence[str]) -> list[Any] | None:
    """Choose onnxruntime execution providers for ``device`` ("cpu", "cuda" or "auto").

    ``available`` is ``onnxruntime.get_available_providers()``. Return a providers list for
    ``InferenceSession`` or None to pass. The built-in fallback (trylast) takes CUDA when
    available and asked for, else CPU.
    """
