"""PyTorch front end: nn.Module (or `module:factory` spec) -> forward ONNX with the layers exposed.

The requested layers' outputs are captured with forward hooks and returned as extra outputs of a
wrapper module, so `torch.onnx.export` names them as graph outputs: no reliance on exporter
internals to find a module's tensor. torch is imported lazily; the runtime never imports this.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import io
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import ExportError

IMAGE_INPUT = "input"
LOGITS = "logits"
CALL_SEPARATOR = "@"  # "name@k": the k-th call (from 0) of a module called several times


def load_model(spec: str, weights: str | None = None):
    """Import `package.module:factory` (dotted attributes allowed), call it, load a state dict."""
    import torch

    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ExportError(f"torch source {spec!r} must look like 'package.module:factory'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ExportError(f"cannot import {module_name!r} for source {spec!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ExportError(f"{module_name!r} has no attribute {attr!r} (source {spec!r})")
        obj = getattr(obj, part)
    model = _call_factory(spec, obj) if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"source {spec!r} did not produce a torch.nn.Module but {type(model).__name__}")
    if weights:
        load_weights(model, weights)
    return model.eval()


def _call_factory(spec: str, factory):
    """factory(), its failure (e.g. downloading weights offline) an ExportError naming the factory."""
    try:
        return factory()
    except Exception as exc:  # a user's factory may raise anything
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(f"the model factory {spec!r} failed: {type(exc).__name__}: {first_line} "
                          "(pass an offline factory, or --weights FILE with a factory that builds the "
                          "model without weights)") from exc


def load_weights(model, path: str) -> None:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable files
        raise ExportError(f"cannot read the weights file {path!r}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"the weights in {path!r} do not fit the model: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )


def select_output(output, key: str | None):
    """The score tensor among a model's outputs: the tensor itself, `output[key]` of a dict
    (torchvision's segmentation models return {"out", "aux"}), or `output[int(key)]` of a tuple/list."""
    import torch

    if isinstance(output, torch.Tensor):
        if key is not None:
            raise ExportError(f"--score-output {key!r}: the model returns one tensor, not a dict or tuple")
        return output
    if isinstance(output, dict):
        if key is None and len(output) == 1:
            return next(iter(output.values()))
        if key not in output:
            raise ExportError(f"the model returns a dict with keys {list(output)}; name the explained one with "
                              "--score-output KEY")
        return output[key]
    if isinstance(output, (tuple, list)):
        if key is None or not key.isdigit() or int(key) >= len(output):
            raise ExportError(f"the model returns {len(output)} outputs; name the explained one with --score-output "
                              f"INDEX (0..{len(output) - 1})")
        return output[int(key)]
    raise ExportError(f"the model returns {type(output).__name__}; camrt explains tensors (or a dict/tuple of them)")


@dataclass(frozen=True)
class LayerRef:
    name: str  # as the user gave it: "layer4" or "_swish@1"
    module: str
    call: int | None


def parse_layer(model, name: str) -> LayerRef:
    module, _, call = name.partition(CALL_SEPARATOR)
    modules = dict(model.named_modules())
    if module not in modules or module == "":
        close = difflib.get_close_matches(module, [n for n in modules if n], n=5, cutoff=0.5)
        raise ExportError(
            f"layer {name!r} does not exist in the model; nearest valid names: {close or 'none'} "
            "(names come from model.named_modules())"
        )
    return LayerRef(name, module, int(call) if call else None)


class _Taps:
    """Forward hooks recording every output of the watched modules, in call order."""

    def __init__(self, model, module_names: Sequence[str]):
        self.calls: dict[str, list] = {n: [] for n in module_names}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._recorder(n)) for n in module_names]

    def _recorder(self, name):
        def hook(module, args, output):
            self.calls[name].append(output)

        return hook

    def clear(self):
        for outputs in self.calls.values():
            outputs.clear()

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def pick(self, ref: LayerRef):
        outputs = self.calls[ref.module]
        if not outputs:
            raise ExportError(f"layer {ref.name!r} is never called in forward()")
        if ref.call is None:
            if len(outputs) > 1:
                raise ExportError(
                    f"module {ref.module!r} is called {len(outputs)} times in forward(); name one call as "
                    f"'{ref.module}{CALL_SEPARATOR}K' with K in 0..{len(outputs) - 1}"
                )
            return _as_tensor(ref, outputs[0])
        if not 0 <= ref.call < len(outputs):
            raise ExportError(f"module {ref.module!r} is called {len(outputs)} times; {ref.name!r} is out of range")
        return _as_tensor(ref, outputs[ref.call])


def _as_tensor(ref: LayerRef, output):
    import torch

    if not isinstance(output, torch.Tensor):
        raise ExportError(f"layer {ref.name!r} returns {type(output).__name__}, not a tensor")
    return output


def spatial_candidates(model, input_size: tuple[int, int]) -> list[str]:
    """Layer names (forward order) whose output has spatial extent; a tensor produced by several
    nested modules is named after the outermost one (shortest name)."""
    import torch

    names = [n for n, _ in model.named_modules() if n]
    taps = _Taps(model, names)
    order: list[tuple[int, str, object]] = []
    counter = iter(range(10**9))
    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(
                lambda m, a, out, name=name: order.append((next(counter), name, out))))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size))
    finally:
        for h in hooks:
            h.remove()
        taps.remove()
    by_tensor: dict[int, list[str]] = {}
    sequence: list[int] = []
    call_index: dict[str, int] = {}
    for _, name, out in order:
        call = call_index.get(name, 0)
        call_index[name] = call + 1
        if not (isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] > 1 and out.shape[3] > 1):
            continue
        key = id(out)
        if key not in by_tensor:
            sequence.append(key)
        label = name if len(taps.calls[name]) <= 1 else f"{name}{CALL_SEPARATOR}{call}"
        by_tensor.setdefault(key, []).append(label)
    # hooks fire inner-first, so the outermost module producing a tensor fires last
    chosen = []
    for key in sequence:
        labels = by_tensor[key]
        chosen.append(min(labels, key=lambda label: (label.count("."), len(label))))
    return chosen


def attention_input_norms(model, input_size: tuple[int, int]) -> list[str]:
    """LayerNorm modules (forward order) whose [B, T, C] output is the input of an attention module
    (a class named ...Attention: timm's, torchvision's MultiheadAttention): ViT's and DeiT's `norm1`,
    pytorch-grad-cam's recommended layer. The graph rule for ONNX sources is
    `camrt.modelfile.token_layout.attention_inputs`."""
    import torch

    made_by: dict[int, tuple[str, object]] = {}  # the output kept alive, so that its id stays its own
    found: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: made_by.__setitem__(id(out), (name, out))))
        elif type(module).__name__.endswith("Attention"):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args: found.append(made_by[id(args[0])][0])
                if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3 and id(args[0]) in made_by
                else None))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(found))


def block_refs(model, maps: Sequence[str]) -> list[LayerRef]:
    """The block of each attention map (`attention.map_block`), as a layer."""
    from .attention import map_block

    return [parse_layer(model, map_block(m)) for m in maps]


class TapModel:
    """Factory of the export wrapper: model outputs followed by the requested layers' outputs, the
    attention maps `maps` (names from `attention.SoftmaxRecorder`) and, with `layer_scores`, LeGrad's
    layer score of each map's block (`attention.layer_score_projection`)."""

    @staticmethod
    def build(model, refs: Sequence[LayerRef], maps: Sequence[str] = (), layer_scores: bool = False,
              score_output: str | None = None):
        import torch

        from .attention import SoftmaxRecorder, layer_score_projection

        blocks = block_refs(model, maps) if layer_scores else []
        projection = layer_score_projection(model) if layer_scores else None

        class _Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model
                self.taps = _Taps(model, sorted({r.module for r in [*refs, *blocks]}))
                self.recorder = SoftmaxRecorder(model) if maps else None

            def forward(self, x):
                self.taps.clear()
                if self.recorder is None:
                    return (select_output(self.model(x), score_output), *[self.taps.pick(r) for r in refs])
                with self.recorder.recording():
                    logits = select_output(self.model(x), score_output)
                recorded = self.recorder.named()
                scores = [projection(self.taps.pick(block)) for block in blocks]
                return (logits, *[self.taps.pick(r) for r in refs], *[recorded[m] for m in maps], *scores)

            def remove_hooks(self):
                self.taps.remove()
                if self.recorder is not None:
                    self.recorder.remove()

        return _Wrapper().eval()


def attention_map_names(model, input_size: tuple[int, int], wanted: Sequence[str] = ()) -> list[str]:
    """The attention maps `wanted` selects (module or map names; empty: all), from one forward pass."""
    import torch

    from .attention import SoftmaxRecorder, select_maps

    recorder = SoftmaxRecorder(model)
    try:
        with recorder.recording():  # with autograd on: nn.MultiheadAttention's inference fast path has no softmax
            model(torch.zeros(1, 3, *input_size))
        available = list(recorder.named())
    finally:
        recorder.remove()
    return select_maps(available, wanted)


@dataclass
class TorchForward:
    """The exported forward graph and the names of its tensors."""

    model: object  # onnx.ModelProto
    logits: str
    layers: dict[str, str]  # layer name -> tensor
    maps: dict[str, str]  # attention-map name -> tensor
    layer_scores: dict[str, str]  # attention-map name -> LeGrad's layer score [B, classes] of its block


def export_forward(model, refs: Sequence[LayerRef], input_size: tuple[int, int], opset: int | None,
                   fold_batchnorm: bool = True, maps: Sequence[str] = (), layer_scores: bool = False,
                   score_output: str | None = None) -> TorchForward:
    """torch.onnx.export (dynamo) with a dynamic batch, with the layers, the attention maps `maps`
    (see `attention_map_names`) and, with `layer_scores`, LeGrad's layer scores as outputs.

    fold_batchnorm=False keeps BatchNormalization nodes: the exporter's optimiser (whose rewrite
    rules fold BatchNorm into the Conv before it) is replaced by its constant folding and dead-node
    removal alone. score_output: which of a dict/tuple output is explained (`select_output`)."""
    import onnx
    import torch

    wrapper = TapModel.build(model, refs, maps, layer_scores, score_output)
    tap_names = ([f"camrt_tap_{i}" for i in range(len(refs))] + [f"camrt_attention_{i}" for i in range(len(maps))]
                 + [f"camrt_layer_score_{i}" for i in range(len(maps) if layer_scores else 0)])
    example = torch.zeros(2, 3, *input_size)
    buffer = io.BytesIO()
    kwargs = {"opset_version": opset} if opset else {}
    try:
        with _quiet_export():
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=[IMAGE_INPUT], output_names=[LOGITS, *tap_names],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), optimize=fold_batchnorm, **kwargs,
            )
            if not fold_batchnorm:
                import onnxscript.optimizer

                onnxscript.optimizer.fold_constants(program.model)
                onnxscript.optimizer.remove_unused_nodes(program.model)
        program.save(buffer)
    except Exception as exc:  # torch.export raises a wide range of types
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}".split("\n")[0]) from exc
    finally:
        wrapper.remove_hooks()
    proto = onnx.load_from_string(buffer.getvalue())
    outputs = [o.name for o in proto.graph.output]
    after_layers = 1 + len(refs)
    return TorchForward(proto, outputs[0], dict(zip([r.name for r in refs], outputs[1:after_layers])),
                        dict(zip(maps, outputs[after_layers:after_layers + len(maps)])),
                        dict(zip(maps, outputs[after_layers + len(maps):])) if layer_scores else {})


@contextmanager
def _quiet_export():
    import contextlib
    import logging
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(previous)


@contextmanager
def relu_backward(rule_set: str):
    """Replace ReLU's backward in torch (modules and functional calls) by a rule set's, for validation."""
    import torch
    import torch.nn.functional as F

    if rule_set == "vanilla":
        yield
        return

    class _Relu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp(min=0)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            if rule_set == "guided":
                return grad.clamp(min=0) * (x > 0).to(grad.dtype)
            return grad.clamp(min=0)

    original = F.relu
    F.relu = lambda x, inplace=False: _Relu.apply(x)
    try:
        yield
    finally:
        F.relu = original


def reference_gradients(model, refs: Sequence[LayerRef], x, targets, rule_set: str = "vanilla",
                        bias_terms: bool = False, maps: Sequence[str] = (), layer_scores: bool = False,
                        score_output: str | None = None, seed=None):
    """Torch autograd oracle: logits, layer activations and gradients, and the input gradient;
    with `bias_terms`, also FullGrad's bias terms (`_BiasTermTaps`); with `maps`, those attention
    maps and their gradients (recorded as the export records them, `attention.SoftmaxRecorder`),
    and with `layer_scores` the gradient of each map's LeGrad layer score.

    The score is sum_b logits[b, target_b] (for logits of rank > 2: the class channel summed over
    the other axes, the top-1 taken on those sums, as the file's target path), or <seed, logits>
    when a `seed` shaped like the logits is given."""
    import torch

    from .attention import SoftmaxRecorder, layer_score_projection

    blocks = block_refs(model, maps) if layer_scores else []
    taps = _Taps(model, sorted({r.module for r in [*refs, *blocks]}))
    bias_taps = _BiasTermTaps(model) if bias_terms else None
    recorder = SoftmaxRecorder(model) if maps else None
    try:
        with relu_backward(rule_set), (recorder.recording() if recorder else contextlib.nullcontext()):
            x = x.clone().requires_grad_(True)
            logits = select_output(model(x), score_output)
            acts = [taps.pick(r) for r in refs]
            attention = [recorder.named()[m] for m in maps] if recorder else []
            per_class = logits.flatten(2).sum(dim=2) if logits.dim() > 2 else logits
            resolved = torch.where(targets < 0, per_class.argmax(dim=1), targets)
            if seed is None:
                score = per_class.gather(1, resolved[:, None]).sum()
            else:
                score = (logits * seed.to(logits.dtype)).sum()
            grads = torch.autograd.grad(score, [*acts, *attention, x], retain_graph=bool(blocks))
            projection = layer_score_projection(model) if blocks else None
            layer_grads = [torch.autograd.grad(projection(taps.pick(block)).gather(1, resolved[:, None]).sum(), [a],
                                               retain_graph=True)[0] for block, a in zip(blocks, attention)]
    finally:
        taps.remove()
        if bias_taps is not None:
            bias_taps.remove()
        if recorder is not None:
            recorder.remove()
    return {
        "logits": logits.detach().numpy(),
        "target": resolved.numpy(),
        "acts": [a.detach().numpy() for a in acts],
        "grads": [g.numpy() for g in grads[:len(acts)]],
        "attention": [a.detach().numpy() for a in attention],
        "attention_grads": [g.numpy() for g in grads[len(acts):-1]],
        "attention_layer_grads": [g.numpy() for g in layer_grads],
        "input_grad": grads[-1].numpy(),
        "bias_terms": bias_taps.terms() if bias_taps is not None else [],
    }


class _BiasTermTaps:
    """FullGrad's bias terms in torch: d score / d output * bias for every call of a Conv2d with a
    bias or a BatchNorm2d (effective bias beta - mean * gamma / sqrt(var + eps)), in call order,
    skipping all-zero biases (as the exporter does). The gradient comes from a tensor hook
    registered when the module returns, so an in-place op afterwards (ReLU(inplace=True)) does not
    change which tensor it belongs to (pytorch-grad-cam's way)."""

    def __init__(self, model):
        import torch

        self.records: list[dict] = []
        self.handles = [module.register_forward_hook(self._record)
                        for module in model.modules()
                        if type(module) in (torch.nn.Conv2d, torch.nn.BatchNorm2d) and module.bias is not None]

    def _record(self, module, args, output):
        import torch

        if isinstance(module, torch.nn.BatchNorm2d):
            bias = -(module.running_mean * module.weight / torch.sqrt(module.running_var + module.eps)) + module.bias
        else:
            bias = module.bias
        record = {"bias": bias.detach()}
        self.records.append(record)
        output.register_hook(lambda grad: record.__setitem__("grad", grad.detach()))

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def terms(self) -> list:
        return [(r["grad"] * r["bias"][None, :, None, None]).numpy()
                for r in self.records if bool((r["bias"] != 0).any())]

