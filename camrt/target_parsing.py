"""`--target` values as target requests (camrt.targets): class indices, lists, top1, topk:K,
above:T, and KIND:VALUE of the target kinds registered through the `register_targets` hook. Apart
from camrt.targets because it reads the plugin registry, which the requests themselves must not
(methods and seeds import camrt.targets)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .contract import TOP1_TARGET
from .errors import UsageError
from .plugins.registry import build_target_registry
from .targets import ClassRequest, TargetListRequest, TargetRequest, ThresholdRequest, TopKRequest


def _flag(option: str) -> str:
    """The `camrt explain` flag of a target option (box_iou: box-iou)."""
    return option.replace("_", "-")


def parse_target(text: str, region: Any = None, **options: Any) -> TargetRequest:
    """--target: a class index, top1 (or -1), topk:K, or KIND:VALUE of a registered target kind
    (the `register_targets` hook; built-in: seg:CLASS with an optional `region` mask file,
    similar:concept.npy, box:x1,y1,x2,y2[:label] with options box_iou, box_format, box_layout,
    camrt.seeds.targets). `region` and `options` (None: not given) go to kinds that take them."""
    value = text.strip().lower()
    given = {name: option for name, option in {"region": region, **options}.items() if option is not None}
    kind, colon, rest = text.strip().partition(":")
    if colon and kind.lower() not in ("topk", "above"):
        registered = build_target_registry().get(kind)
        unknown = [name for name in given if name not in registered.options]
        if unknown:
            raise UsageError(f"--{_flag(unknown[0])} does not apply to --target {kind}:... ({text!r})")
        return registered.parse(rest, **given)
    if given:
        name = next(iter(given))
        registry = build_target_registry()
        kinds = [f"{k}:..." for k in registry.names() if name in registry.get(k).options]
        raise UsageError(f"--{_flag(name)} applies to --target {' or '.join(kinds) or 'no kind'}, not to {text!r}")
    if value in ("top1", "top-1", str(TOP1_TARGET)):
        return ClassRequest(TOP1_TARGET)
    if value.startswith("topk:"):
        k = value[len("topk:"):]
        if not k.isdigit() or int(k) < 1:
            raise UsageError(f"--target topk:K needs a whole number K >= 1, got {text!r}")
        return TopKRequest(int(k))
    if value.startswith("above:"):
        return _parse_threshold(text.strip(), value[len("above:"):])
    if "," in value:
        return _parse_class_list(text.strip(), value)
    try:
        target = int(value)
    except ValueError:
        raise UsageError(f"--target must be a class index, a list of them (3,7), top1, topk:K, above:T, seg:CLASS, "
                         f"similar:FILE.npy or box:x1,y1,x2,y2[:label], got {text!r}") from None
    if target < 0:
        raise UsageError(f"--target must be a class index >= 0, top1 or topk:K, got {text!r}")
    return ClassRequest(target)


def _parse_class_list(text: str, value: str) -> TargetListRequest:
    """N,M,...: class indices >= 0, each once."""
    parts = [part.strip() for part in value.split(",")]
    bad = [part for part in parts if not part.isdigit()]
    if bad:
        raise UsageError(f"--target {text}: a class list takes class indices >= 0 separated by commas; "
                         f"{bad[0]!r} is not one")
    classes = [int(part) for part in parts]
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise UsageError(f"--target {text}: class {repeated[0]} is listed twice")
    return TargetListRequest(tuple(ClassRequest(c) for c in classes))


def _parse_threshold(text: str, value: str) -> ThresholdRequest:
    """above:T (score > T) or above:sigmoid:P (sigmoid(score) > P, 0 < P < 1)."""
    sigmoid = value.startswith("sigmoid:")
    number = value[len("sigmoid:"):] if sigmoid else value
    try:
        threshold = float(number)
    except ValueError:
        threshold = float("nan")
    if not np.isfinite(threshold) or (sigmoid and not 0 < threshold < 1):
        raise UsageError(f"--target above:T (a score) or above:sigmoid:P (0 < P < 1) needs a number, got {text!r}")
    return ThresholdRequest(threshold, sigmoid)


def parse_targets(texts: str | Sequence[str], region: Any = None, **options: Any) -> TargetRequest:
    """--target given once or more: several one-target values (--target seg:3 --target seg:7) are
    one `TargetListRequest`; `options` (as `parse_target`'s) apply to each of them. `region`
    (--region, repeatable): one mask (a path, or a sequence of one) for every target whose kind takes
    a region (seg:), or one per such target, paired in the order given (`regions_per_target`)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        return ClassRequest(TOP1_TARGET)
    regions = regions_per_target(texts, region)
    if len(texts) == 1:
        return parse_target(texts[0], regions[0], **options)
    requests = [parse_target(text, mask, **options) for text, mask in zip(texts, regions)]
    for text, request in zip(texts, requests):
        if request.ranks != [None]:
            raise UsageError(f"--target {text} makes several maps per input; repeat --target only with one-target "
                             "values (N, top1, seg:C, similar:F, box:...)")
    for i, request in enumerate(requests):
        if request in requests[:i]:
            raise UsageError(f"--target {texts[i]} is given twice")
    return TargetListRequest(tuple(requests))


def regions_per_target(texts: Sequence[str], region: Any) -> list[Any]:
    """Each --target's --region (None: none given for it): none given, None for all; one, for every
    target whose kind takes a region; as many as those targets, one each in order. UsageError naming
    --region otherwise, or when no target takes one."""
    regions = [] if region is None else [region] if isinstance(region, (str, os.PathLike)) else list(region)
    if not regions:
        return [None] * len(texts)
    registry = build_target_registry()
    takes = [i for i, text in enumerate(texts) if _kind(text) in registry.names()
             and "region" in registry.get(_kind(text)).options]
    if not takes:
        return [regions[0]] * len(texts)  # parse_target names the flag and the kinds that take it
    if len(regions) not in (1, len(takes)):
        raise UsageError(f"--region is given {len(regions)} times for {len(takes)} --target values that take a region "
                         f"({', '.join(texts[i] for i in takes)}): give it once (the region of every one) or once "
                         "for each, in the order of --target (--region argmax: the default region)")
    paired = iter(regions * len(takes) if len(regions) == 1 else regions)
    return [next(paired) if i in takes else None for i in range(len(texts))]


def _kind(text: str) -> str:
    """The registry name of a KIND:VALUE target ("" for a class target)."""
    kind, colon, _ = text.strip().partition(":")
    return kind.lower() if colon else ""
