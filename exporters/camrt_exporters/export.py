"""The two front ends (torch, onnx) that produce validated camrt contract files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import pluggy

from camrt import contract
from camrt.errors import PluginError
from camrt.modelfile.layers import choose_default_layer
from camrt.modelfile.shapes import forget_inferred_shapes
from camrt.modelfile.token_layout import default_layer, infer_layer_layouts, sequence_layout
from camrt.plugins import ensure_registered, get_plugin_manager

from . import __version__
from .attention import onnx_attention_maps
from .autodiff.graph import GraphIndex
from .autodiff.reverse import RuleSet
from .contract_file import (
    build_contract_model,
    choose_score,
    contract_metadata,
    copy_exported_batch,
    prepare,
    require_batch_carried,
)
from .errors import ExportError
from .layouts import LayoutOverride, image_layout, layout_candidates, resolve_layer_layouts, resolve_tokens
from .validate import Check, validate_against_torch, validate_finite_differences

DEFAULT_RULE_SETS = (contract.RULE_VANILLA, contract.RULE_GUIDED)
IMAGENET_LABELS = "imagenet"


def rule_sets(pm: pluggy.PluginManager | None = None) -> dict[str, RuleSet]:
    """Every rule set registered through the `register_gradient_rules` hook of `pm` (default: the
    process-wide manager), built-ins included; none when the exporter's plugin is blocked."""
    pm = pm or get_plugin_manager()
    ensure_registered(pm, "camrt_exporters.plugin")  # declares the hook unless blocked
    found: dict[str, RuleSet] = {}
    hook = getattr(pm.hook, "register_gradient_rules", None)
    if hook is None:
        return found

    def register(rule_set: RuleSet) -> None:
        if rule_set.name in found:
            raise PluginError(f"rule set {rule_set.name!r} registered twice; registered: {sorted(found)}")
        found[rule_set.name] = rule_set

    hook(register=register)
    return found


def resolve_rule_sets(names: Sequence[str]) -> tuple[RuleSet, list[RuleSet]]:
    """The vanilla rule set (layer gradients always use it) and the requested input-gradient sets."""
    available = rule_sets()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ExportError(f"unknown rule set(s) {unknown}; registered: {sorted(available)}")
    return available[contract.RULE_VANILLA], [available[n] for n in names]


def _choose_layer(candidates: list[str], framework: str) -> str:
    choice = choose_default_layer(candidates, framework)
    if choice is None:
        raise ExportError("no layer with spatial extent feeds the score; name one with --layer")
    return choice


def _default_onnx_layer(index: GraphIndex, candidates: list[str], layouts: dict[str, contract.LayerLayout],
                        log: Callable[[str], None]) -> str:
    """`token_layout.default_layer`, the one `camrt inspect` shows for the plain file."""
    choice = default_layer(index.nodes, lambda name: index.value(name) is not None, candidates, layouts)
    if choice is None:
        raise ExportError("no layer with spatial extent feeds the score; name one with --layer")
    log(f"default layer: {choice.tensor} ({_layout_text(layouts[choice.tensor])}; {choice.reason})")
    return choice.tensor


def _default_torch_layer(model, input_size: tuple[int, int], log: Callable[[str], None]) -> str:
    """The torch twin of `_default_onnx_layer`, on module names."""
    from .torch_frontend import attention_input_norms, spatial_candidates

    attention = attention_input_norms(model, input_size)
    if attention:
        log(f"default layer: {attention[-1]} (the LayerNorm feeding the last attention)")
        return attention[-1]
    choice = _choose_layer(spatial_candidates(model, input_size), "torch")
    log(f"default layer: {choice} (the last output with spatial extent)")
    return choice


def _layout_text(layout: contract.LayerLayout) -> str:
    if layout.layout != contract.LAYOUT_TOKENS:
        return layout.layout
    extra = f", extra tokens at {list(layout.extra_tokens)}" if layout.extra_tokens else ""
    return f"tokens on a {layout.grid[0]}x{layout.grid[1]} grid{extra}"


def resolve_labels(labels: str | Sequence[str] | None) -> list[str] | None:
    """`imagenet` (from torchvision, export side only), a text file with one label per line, or a list."""
    if labels is None or isinstance(labels, (list, tuple)):
        return list(labels) if labels else None
    if labels == IMAGENET_LABELS:
        try:
            from torchvision.models._meta import _IMAGENET_CATEGORIES
        except ImportError as exc:
            raise ExportError("--labels imagenet needs torchvision on the export machine") from exc
        return list(_IMAGENET_CATEGORIES)
    path = Path(labels)
    if not path.is_file():
        raise ExportError(f"labels file {labels!r} does not exist (give a text file, one label per line, or 'imagenet')")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _check_labels(labels: list[str] | None, num_classes: int) -> None:
    if labels is not None and len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels given for a model with {num_classes} classes")


def export_torch(
    model,
    *,
    layers: Sequence[str] = (),
    input_size: tuple[int, int] = (224, 224),
    rules: Sequence[str] = DEFAULT_RULE_SETS,
    preprocessing: contract.Preprocessing | None = None,
    labels: str | Sequence[str] | None = None,
    source_name: str = "",
    opset: int | None = None,
    fullgrad: bool = False,
    layouts: Mapping[str, LayoutOverride] | None = None,
    attention: Sequence[str] | None = None,
    attention_tokens: LayoutOverride | None = None,
    attention_layer_scores: bool = False,
    seed: bool = False,
    score_output: str | None = None,
    compact: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[onnx.ModelProto, list[Check]]:
    """Export a torch classifier; validated against torch autograd. Returns the model and the checks.

    layouts: `--layout` overrides of the layers' layouts (default: inferred from the exported graph).
    attention: expose attention maps and their gradients (`camrt_exporters.attention`): module or
    map names, or empty for every attention softmax over the token sequence; None: none.
    attention_tokens: the token sequence the maps attend over (`--attention-tokens`, a tokens layout
    spec, `layouts.parse_attention_tokens`); None: the one the graph establishes (`token_layout`). attention_layer_scores: also the gradient of each map's
    LeGrad layer score (`attention.layer_score_projection`; timm and torchvision ViTs).
    seed: give the file the seed entry `camrt/seed` (any score tensor of rank >= 2: segmentation
    logits, detection heads, embeddings). score_output: the key (dict) or index (tuple) of the
    explained output when the model returns several (torchvision's segmentation models: "out").
    compact: the input-gradient subgraphs share the forward's Conv weights (ConvTranspose) instead of
    storing flipped copies: a smaller file, a slower backward (docs/edge.md).

    fullgrad: add FullGrad's bias-gradient terms. The ONNX exporter's optimiser folds each
    BatchNorm into the Conv before it, which would merge two of FullGrad's terms into one, so the
    graph is then exported unoptimised (BatchNormalization nodes kept, as pytorch-grad-cam hooks
    BatchNorm2d modules); the file runs somewhat slower for every method.
    """
    from .torch_frontend import attention_map_names, export_forward, parse_layer

    model = model.eval()
    names = list(layers) or [_default_torch_layer(model, input_size, log)]
    refs = [parse_layer(model, n) for n in names]
    vanilla, input_rule_sets = resolve_rule_sets(rules)
    if attention_layer_scores and attention is None:
        raise ExportError("--attention-layer-scores needs --attention (the maps whose gradients it adds)")
    maps = attention_map_names(model, input_size, attention) if attention is not None else []
    exported = export_forward(model, refs, input_size, opset, fold_batchnorm=not fullgrad, maps=maps,
                              layer_scores=attention_layer_scores, score_output=score_output)
    forward, logits, tensors = prepare(exported.model), exported.logits, exported.layers
    index = GraphIndex(forward)
    score = choose_score(index, logits, seeded=seed)
    image_input = forward.graph.input[0].name
    inferred = infer_layer_layouts(index.nodes, index.shape, image_input, contract.LAYOUT_NCHW, index.value)
    layer_layouts = resolve_layer_layouts(index, tensors, inferred, layouts or {}, ())
    map_tensors, attention_tokens = _matching_maps(index, exported.maps, attention, inferred, attention_tokens, log)
    layer_scores = {name: exported.layer_scores[name] for name in map_tensors if name in exported.layer_scores}
    labels = resolve_labels(labels)
    _check_labels(labels, index.shape(score.tensor)[1])
    preprocessing = preprocessing or contract.Preprocessing(*input_size)
    meta = contract_metadata(
        layers=names, default=names[0], preprocessing=preprocessing, rule_sets=list(rules), labels=labels,
        source={"framework": "torch", "model": source_name or type(model).__name__}, score=score,
        image_input=image_input, exporter_version=__version__, layer_layouts=layer_layouts,
    )
    _add_attention_metadata(meta, map_tensors, attention_tokens, bool(layer_scores))
    result = build_contract_model(
        forward, image_input=image_input, score=score, layers=tensors, layer_layouts=layer_layouts,
        input_rule_sets=input_rule_sets, vanilla=vanilla,
        metadata=meta, keep_outputs=[logits], fullgrad=fullgrad, attention=map_tensors, layer_scores=layer_scores,
        seeded=seed, compact=compact,
    )
    checks = validate_against_torch(model, result, refs, tensors, list(rules), image_input, input_size,
                                    maps=list(map_tensors), layer_scores=bool(layer_scores), score_output=score_output)
    return result, checks


def _matching_maps(index: GraphIndex, maps: dict[str, str], wanted: Sequence[str] | None,
                   layouts: dict[str, contract.LayerLayout], given: LayoutOverride | None,
                   log: Callable[[str], None]) -> tuple[dict[str, str], contract.LayerLayout | None]:
    """(the attention maps over the token sequence, its layout). The layout is `given`
    (--attention-tokens) resolved against the maps' length T, else the one the graph establishes
    (`layouts`, `token_layout`) for sequences of that length; named maps (`wanted`) must all attend
    over it, else the maps that do are kept."""
    if wanted is None:
        return {}, None
    lengths = {name: index.shape(tensor)[2] for name, tensor in maps.items()}
    if given is not None:
        tokens = _given_tokens(given, set(lengths.values()))
    else:
        found = {layout for layout in (sequence_layout(layouts, length) for length in set(lengths.values())) if layout}
        if len(found) != 1:
            what = "none of them" if not found else f"several ({', '.join(str(f.to_dict()) for f in found)})"
            raise ExportError(f"--attention: the maps attend over {sorted(set(lengths.values()))} tokens and the graph "
                              f"establishes the patch grid and extra tokens of {what}; give them with "
                              "--attention-tokens tokens:HxW:P,... (e.g. tokens:14x14:0: a 14x14 patch grid and a "
                              "class token at position 0)")
        tokens = found.pop()
    count = len(tokens.extra_tokens) + tokens.grid[0] * tokens.grid[1]
    other = [f"{name} (T = {length})" for name, length in lengths.items() if length != count]
    if other and wanted:
        raise ExportError(f"--attention: map(s) {', '.join(other)} do not attend over the {count} tokens of the "
                          f"token grid {tokens.to_dict()}")
    matching = {name: tensor for name, tensor in maps.items() if lengths[name] == count}
    if not matching:
        raise ExportError(f"--attention: no attention map attends over the {count} tokens of the token grid "
                          f"{tokens.to_dict()} (found: {', '.join(other)})")
    log(f"attention maps: {', '.join(matching)} over {tokens.grid[0]}x{tokens.grid[1]} patches and extra tokens at "
        f"{list(tokens.extra_tokens)}")
    return matching, tokens


def _given_tokens(given: LayoutOverride, lengths: set[int]) -> contract.LayerLayout:
    """`--attention-tokens` as a layout: complete as given (grid and extra tokens), else completed
    from the maps' one length T."""
    if given.grid is not None and given.extra_tokens is not None:
        count = given.grid[0] * given.grid[1] + len(given.extra_tokens)
        return resolve_tokens(given, count, "--attention-tokens")
    if len(lengths) != 1:
        raise ExportError(f"--attention-tokens: the maps attend over {sorted(lengths)} tokens; give the grid and the "
                          "extra tokens in full, tokens:HxW:P,...")
    return resolve_tokens(given, lengths.pop(), "--attention-tokens")


def _add_attention_metadata(meta: dict[str, str], maps: dict[str, str], tokens: contract.LayerLayout | None,
                            layer_scores: bool = False) -> None:
    if maps:
        meta[contract.META_ATTENTION] = contract.Attention(tuple(maps), tokens, layer_scores).to_json()


def _image_input(model: onnx.ModelProto, name: str | None) -> onnx.ValueInfoProto:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if name:
        match = [i for i in inputs if i.name == name]
        if not match:
            raise ExportError(f"input {name!r} not found; the model's inputs are {[i.name for i in inputs]}")
        return match[0]
    if len(inputs) != 1:
        raise ExportError(f"the model has inputs {[i.name for i in inputs]}; name the image input with --input-name")
    return inputs[0]


#: The image input types camrt feeds (the runtime feeds the image in the model's own type).
IMAGE_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
#: Float types the gradient graph cannot use: onnxruntime's CPU kernels lack them for most ops.
_UNSUPPORTED_FLOATS = {onnx.TensorProto.BFLOAT16: "bfloat16"}


def _require_supported_floats(model: onnx.ModelProto, image: onnx.ValueInfoProto) -> None:
    """ExportError unless the image input is float32 or float16 and no tensor of the graph is bfloat16.

    Integer (quantized) graphs need no check here: QDQ ones are differentiated straight through, and
    the integer ops of others (QLinearConv, ...) are refused by name when differentiated."""
    elem_type = image.type.tensor_type.elem_type
    if elem_type not in IMAGE_TYPES:
        raise ExportError(
            f"the image input {image.name!r} is {onnx.TensorProto.DataType.Name(elem_type).lower()}; camrt exports "
            "models that take float32 or float16 images: export the float model (quantize it with QDQ nodes, "
            "or cast inside the graph)"
        )
    tensors = [*model.graph.initializer, *(a.t for n in model.graph.node for a in n.attribute if a.HasField("t"))]
    typed = [(t.name, t.data_type) for t in tensors]
    typed += [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.value_info, *model.graph.output]]
    typed += [(n.output[0], a.i) for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    for name, kind in typed:
        if kind in _UNSUPPORTED_FLOATS:
            raise ExportError(
                f"tensor {name!r} is {_UNSUPPORTED_FLOATS[kind]}; camrt's gradient graphs run in float32 or float16 "
                "(onnxruntime's CPU kernels lack bfloat16 for them): export the float32 or float16 model"
            )


@dataclass(frozen=True)
class ImageGeometry:
    """The image input's layout, channel count and the (height, width) the exported file is pinned to."""

    layout: str
    channels: int
    height: int
    width: int


def _pin_image_geometry(image: onnx.ValueInfoProto, input_size: tuple[int, int] | None,
                        input_layout: str | None = None) -> ImageGeometry:
    """Make the batch of the image input dynamic and its H, W static; return its geometry.

    The layout (NCHW or NHWC) is `input_layout` (--input-layout) or told by the channel axis. A
    literal -1, symbolic or missing batch becomes the dynamic batch `batch`. Open (symbolic or -1)
    H, W take `input_size` (--input-size); static ones must agree with it. Modifies `image` in place.
    """
    if not image.type.tensor_type.HasField("shape"):
        raise ExportError(f"image input {image.name!r} declares no shape; camrt needs NCHW or NHWC with a static "
                          "channel count: re-export the model with the input's shape")
    dims = image.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ExportError(f"image input {image.name!r} must be NCHW or NHWC (rank 4); it has rank {len(dims)}")
    shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    static_dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    layout = image_layout(image.name, static_dims, input_layout)
    channel_axis, spatial_axes = (3, (1, 2)) if layout == contract.LAYOUT_NHWC else (1, (2, 3))
    if static_dims[channel_axis] is None:
        raise ExportError(f"image input {image.name!r} {shown}: its channel count (axis {channel_axis}) must be static")
    static = [static_dims[a] for a in spatial_axes]
    if input_size is None and None in static:
        raise ExportError(f"image input {image.name!r} {shown} has open height/width: pin them with --input-size H,W")
    if input_size is not None and any(s is not None and s != want for s, want in zip(static, input_size)):
        raise ExportError(f"--input-size {input_size[0]},{input_size[1]} differs from the model's "
                          f"{shown[spatial_axes[0]]},{shown[spatial_axes[1]]} (image input {image.name!r})")
    height, width = input_size if input_size is not None else static
    dims[0].Clear()
    dims[0].dim_param = "batch"  # one file serves every batch size
    dims[spatial_axes[0]].dim_value, dims[spatial_axes[1]].dim_value = height, width
    return ImageGeometry(layout, static_dims[channel_axis], height, width)


def default_preprocessing(height: int, width: int, channels: int) -> contract.Preprocessing:
    """ImageNet's mean and std for 3 channels; x = pixel * scale (mean 0, std 1) for any other count."""
    if channels == 3:
        return contract.Preprocessing(height, width)
    return contract.Preprocessing(height, width, mean=(0.0,) * channels, std=(1.0,) * channels)


def _preprocessing_for(geometry: ImageGeometry, preprocessing: contract.Preprocessing | None,
                       log: Callable[[str], None]) -> contract.Preprocessing:
    """The given preprocessing at the pinned size, or the default one for the model's channel count."""
    if preprocessing is None:
        if geometry.channels != 3:
            log(f"{geometry.channels}-channel input: preprocessing x = pixel / 255 (give --mean/--std if the model "
                "expects other values)")
        return default_preprocessing(geometry.height, geometry.width, geometry.channels)
    if len(preprocessing.mean) != geometry.channels or len(preprocessing.std) != geometry.channels:
        raise ExportError(f"--mean/--std give {len(preprocessing.mean)}/{len(preprocessing.std)} values for a model "
                          f"with {geometry.channels} input channel(s): give one value or one per channel")
    return replace(preprocessing, height=geometry.height, width=geometry.width)


def read_image_geometry(path: str | os.PathLike, input_name: str | None = None,
                        input_size: tuple[int, int] | None = None, input_layout: str | None = None) -> ImageGeometry:
    """The geometry an export of the ONNX file at `path` would pin (ExportError when it cannot)."""
    source = _load(path, load_external_data=False)
    return _pin_image_geometry(_image_input(source, input_name), input_size, input_layout)


def _load(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    try:
        return onnx.load(os.fspath(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises others
        raise ExportError(f"{os.fspath(path)!r} is not a readable ONNX file: {exc}") from exc


def export_onnx(
    path: str | os.PathLike,
    *,
    layers: Sequence[str] = (),
    rules: Sequence[str] = DEFAULT_RULE_SETS,
    input_size: tuple[int, int] | None = None,
    preprocessing: contract.Preprocessing | None = None,
    labels: str | Sequence[str] | None = None,
    input_name: str | None = None,
    output: str | None = None,
    use_softmax_output: bool = False,
    fullgrad: bool = False,
    input_layout: str | None = None,
    layouts: Mapping[str, LayoutOverride] | None = None,
    attention: Sequence[str] | None = None,
    attention_tokens: LayoutOverride | None = None,
    seed: bool = False,
    compact: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[onnx.ModelProto, list[Check]]:
    """Export any ONNX classifier (layers are tensor names); validated by finite differences.

    input_size: (H, W) pinning an image input whose height and width are open (symbolic or -1);
    when None, the size of `preprocessing` does. output: the model output to explain (default: the
    one that looks like class scores, see `choose_score`).
    fullgrad: add FullGrad's bias-gradient terms of the file's Conv and BatchNormalization nodes
    (a BatchNorm already folded into its Conv counts once). input_layout: the image input's
    layout, nchw or nhwc (default: told by where its 1, 3 or 4 channels are). layouts: `--layout`
    overrides of the layers' layouts (default: inferred from the graph, `camrt.modelfile.token_layout`).
    attention, attention_tokens: as for `export_torch`, with tensor names (Softmax outputs) for map
    names. seed: give the file the seed entry `camrt/seed` (any score tensor of rank >= 2, see
    `export_torch`). compact: as for `export_torch`.

    QDQ int8 models are differentiated straight through their QuantizeLinear/DequantizeLinear pairs
    (autodiff/rules/quantize.py), float16 models in float16 (the image input keeps the model's type)."""
    source = _load(path)
    image = _image_input(source, input_name)
    _require_supported_floats(source, image)
    if input_size is None and preprocessing is not None:
        input_size = (preprocessing.height, preprocessing.width)
    exported_batch = image.type.tensor_type.shape.dim[0].dim_value if image.type.tensor_type.HasField("shape") else 0
    exported = GraphIndex(source) if exported_batch > 0 else None  # the shapes at its static batch
    geometry = _pin_image_geometry(image, input_size, input_layout)
    layout = geometry.layout
    forget_inferred_shapes(source)
    forward = prepare(source)
    if exported is not None:
        copy_exported_batch(forward, exported, exported_batch, log)
    index = GraphIndex(forward)
    score = choose_score(index, output, use_softmax_output, log, seeded=seed)
    require_batch_carried(index, image.name, score.tensor)
    inferred = infer_layer_layouts(index.nodes, index.shape, image.name, layout, index.value)
    map_tensors, attention_tokens = ({}, None) if attention is None else _matching_maps(
        index, onnx_attention_maps(index, image.name, score.tensor, attention), attention, inferred,
        attention_tokens, log)
    names = list(layers)
    for name in names:
        if name not in index.shapes and name not in index.producer:
            import difflib

            close = difflib.get_close_matches(name, list(index.producer), n=5, cutoff=0.5)
            raise ExportError(f"tensor {name!r} does not exist in {os.fspath(path)!r}; nearest: {close or 'none'}")
    candidates = layout_candidates(index, image.name, score.tensor, inferred)
    names = names or [_default_onnx_layer(index, candidates, inferred, log)]
    layer_layouts = resolve_layer_layouts(index, {n: n for n in names}, inferred, layouts or {}, candidates)
    preprocessing = replace(_preprocessing_for(geometry, preprocessing, log), layout=layout)
    labels = resolve_labels(labels)
    _check_labels(labels, index.shape(score.tensor)[1])
    vanilla, input_rule_sets = resolve_rule_sets(rules)
    meta = contract_metadata(
        layers=names, default=names[0], preprocessing=preprocessing, rule_sets=list(rules), labels=labels,
        source={"framework": "onnx", "model": Path(path).name}, score=score, image_input=image.name,
        exporter_version=__version__, layer_layouts=layer_layouts,
    )
    _add_attention_metadata(meta, map_tensors, attention_tokens)
    result = build_contract_model(
        forward, image_input=image.name, score=score, layers={n: n for n in names}, layer_layouts=layer_layouts,
        input_rule_sets=input_rule_sets, vanilla=vanilla,
        metadata=meta, keep_outputs=[o.name for o in forward.graph.output], fullgrad=fullgrad,
        attention=map_tensors, seeded=seed, compact=compact,
    )
    checks = validate_finite_differences(forward, result, {n: n for n in names}, image.name, score.tensor,
                                         tuple(d.dim_value for d in image.type.tensor_type.shape.dim[1:]),
                                         maps=map_tensors)
    return result, checks


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model.SerializeToString())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
