"""camrt plugin of the exporters: the exporter's hooks, the built-in rule sets and the `camrt export`
command. Loaded through the entry point of group ``camrt``; it imports neither onnx nor torch."""

from __future__ import annotations

import click

from camrt.hookspecs import hookimpl


@hookimpl
def declare_hooks(declare):
    from . import hookspecs

    declare(hookspecs)


@hookimpl
def register_gradient_rules(register):
    from .autodiff.rules import BUILTIN_RULE_SETS

    for rule_set in BUILTIN_RULE_SETS:
        register(rule_set)


def _floats(text: str | None, count: int, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected {count} comma-separated numbers, got {text!r}", param_hint=option)
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise click.BadParameter(f"expected {count} comma-separated numbers, got {text!r}", param_hint=option)
    return values


def _preprocessing(height: int, width: int, channels: int, mean: str | None, std: str | None, scale: float | None,
                   channel_order: str):
    """The preprocessing the flags give, the defaults of `default_preprocessing` for the others."""
    from camrt import contract

    from .export import default_preprocessing

    default = default_preprocessing(height, width, channels)
    return contract.Preprocessing(
        height, width,
        mean=_floats(mean, channels, "--mean") or default.mean,
        std=_floats(std, channels, "--std") or default.std,
        scale=default.scale if scale is None else scale,
        channel_order=channel_order,
    )


EXPORT_EPILOG = """\b
Examples:
  camrt export torchvision.models:resnet18 --layer layer4 --layer layer3 --rules vanilla,guided --input-size 112,112 -o r18.camrt.onnx
  camrt export torchvision.models:squeezenet1_1 --weights squeezenet.pth --input-size 64,64 --labels labels.txt -o sq.camrt.onnx
  camrt export plain.onnx --mean 0.5 --std 0.5 --channel-order bgr -o plain.camrt.onnx
"""


@hookimpl
def register_commands(cli):
    @cli.command(epilog=EXPORT_EPILOG)
    @click.argument("source")
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The camrt .onnx file to write.")
    @click.option("--layer", "layers", multiple=True, help="Layer to expose: a dotted module name (torch) or a tensor name (onnx). Repeatable. Default: the "
                  "LayerNorm feeding the last attention (ViT, DeiT), else the last tensor with spatial extent.")
    @click.option("--layout", "layouts", multiple=True, metavar="LAYER=SPEC", help="The layout of a layer, LAYER=nchw|nhwc|tokens[:HxW[:P,P...]] (tokens: the grid "
                  "and the positions of the extra tokens, e.g. blocks.11.norm1=tokens:14x14:0). Default: inferred "
                  "from the graph; a layer whose layout cannot be inferred needs it. Repeatable.")
    @click.option("--rules", default="vanilla,guided", show_default=True, help="Rule sets of the input gradients to add (vanilla, guided, deconvnet; plugins add more, "
              "e.g. camrt-lrp's lrp-epsilon-plus-flat).")
    @click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="A state-dict file to load into a torch model.")
    @click.option("--input-size", help="H,W of the model input (torch default 224,224; onnx: from the model, "
                  "required when its height/width are open, e.g. symbolic or -1).")
    @click.option("--mean", help="Per-channel mean after scaling: one value or one per input channel "
                  "(default ImageNet's for 3-channel inputs).")
    @click.option("--std", help="Per-channel std: one value or one per input channel (default ImageNet's for "
                  "3-channel inputs).")
    @click.option("--scale", type=float, help="Pixel scale applied before mean/std (default 1/255).")
    @click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True)
    @click.option("--labels", help="Class names: a text file with one per line, or 'imagenet'.")
    @click.option("--input-name", help="ONNX source: the image input when the model has several inputs.")
    @click.option("--score-output", help="The model output to explain. ONNX source: an output name (default: the "
                  "only [batch, classes] output, or the only one behind a Softmax/Sigmoid); torch source returning "
                  "a dict or tuple: its key or index (torchvision segmentation: out).")
    @click.option("--seed", "seed", is_flag=True, help="Add the seed entry camrt/seed: the file then differentiates "
                  "<seed, score> for any seed the runtime feeds, and may explain a score of any rank >= 2 "
                  "(segmentation logits [B,C,H,W], raw detection heads [B,4+C,N], embeddings [B,D]).")
    @click.option("--input-layout", type=click.Choice(["nchw", "nhwc"]), help="ONNX source: the image input's "
                  "layout (default: told by where its 1, 3 or 4 channels are; Keras/tf2onnx files are nhwc).")
    @click.option("--softmax-output", is_flag=True, help="Differentiate the Softmax/Sigmoid output instead of the "
                  "logits before it.")
    @click.option("--opset", type=int, help="ONNX opset for torch sources.")
    @click.option("--fullgrad", is_flag=True, help="Add FullGrad's bias-gradient terms (every Conv bias and "
                  "BatchNorm; torch sources keep BatchNorm unfused). Implies the vanilla input gradient.")
    @click.option("--attention", "attention", is_flag=True, help="Add the attention maps (every Softmax over the last "
                  "axis with an output [batch, heads, T, T] over the token sequence) and their gradients, for "
                  "attention-rollout and generic-attention.")
    @click.option("--attention-map", "attention_maps", multiple=True, metavar="NAME", help="Only these attention "
                  "maps: a module name (torch; its maps) or a Softmax output tensor (onnx). Repeatable; implies "
                  "--attention.")
    @click.option("--attention-tokens", metavar="SPEC", help="The token sequence of the attention maps, in "
                  "--layout's syntax: tokens[:HxW[:P,P...]] (the patch grid and the positions of the extra tokens: "
                  "class, distillation, registers), e.g. tokens:14x14:0. Default: established from the graph.")
    @click.option("--attention-layer-scores", is_flag=True, help="torch sources: also the gradient of each attention "
                  "map's layer score (the model's final norm and head applied to the mean token of the map's "
                  "block), for legrad; timm and torchvision vision transformers. Implies --attention.")
    @click.option("--compact", is_flag=True, help="Input gradients share the model's Conv weights (ConvTranspose) "
                  "instead of storing flipped copies: a smaller file, a slower backward (docs/edge.md).")
    def export(source, output, layers, rules, weights, input_size, mean, std, scale, channel_order, labels,
               input_name, score_output, seed, input_layout, softmax_output, opset, fullgrad, layouts, attention,
               attention_maps, attention_tokens, attention_layer_scores, compact):
        """Export SOURCE (a .onnx file or a torch 'package.module:factory') to a camrt file.

        The file carries the model's outputs, the activations and gradients of the chosen layers
        and the input gradients of the chosen rule sets. It is validated (torch autograd, or
        finite differences for ONNX sources) before it is written; on failure nothing is written.
        """
        from camrt import contract

        from .errors import ExportError
        from .export import export_onnx, export_torch, read_image_geometry, write_model
        from .layouts import parse_attention_tokens, parse_layout_overrides
        from .torch_frontend import load_model

        size = _floats(input_size, 2, "--input-size")
        size = (int(size[0]), int(size[1])) if size else None
        is_onnx = source.endswith(".onnx")
        torch_only = [flag for flag, given in (("--weights", weights), ("--opset", opset is not None)) if given]
        if input_layout and not is_onnx:
            raise click.UsageError(f"--input-layout applies to ONNX sources; torch sources ({source}) are NCHW")
        if is_onnx and torch_only:
            raise click.UsageError(f"{' and '.join(torch_only)} apply to torch sources; {source} is an ONNX file "
                                   "(its weights are in it; its opset is kept, raised to 16 when older)")
        if is_onnx and attention_layer_scores:
            raise click.UsageError(f"--attention-layer-scores applies to torch sources; {source} is an ONNX file (the "
                                   "layer scores apply the model's head to each block's tokens, built from its modules)")
        rule_names = [r.strip() for r in rules.split(",") if r.strip()]
        if fullgrad and contract.RULE_VANILLA not in rule_names:
            rule_names.append(contract.RULE_VANILLA)
        log = lambda message: click.echo(message, err=True)  # noqa: E731
        try:
            overrides, given_tokens = parse_layout_overrides(layouts), parse_attention_tokens(attention_tokens)
        except ExportError as exc:
            raise click.UsageError(str(exc)) from None
        wants_attention = attention or attention_maps or attention_layer_scores
        attention_options = {"attention": list(attention_maps) if wants_attention else None,
                             "attention_tokens": given_tokens}
        if is_onnx:
            preprocessing = None
            if mean or std or scale is not None or channel_order != "rgb":
                geometry = read_image_geometry(source, input_name, size, input_layout)
                preprocessing = _preprocessing(geometry.height, geometry.width, geometry.channels, mean, std, scale,
                                               channel_order)
            model, checks = export_onnx(source, layers=layers, rules=rule_names, input_size=size,
                                        preprocessing=preprocessing, labels=labels, input_name=input_name,
                                        output=score_output, use_softmax_output=softmax_output,
                                        fullgrad=fullgrad, input_layout=input_layout, layouts=overrides, seed=seed,
                                        compact=compact, log=log, **attention_options)
        else:
            height, width = size or (224, 224)
            preprocessing = _preprocessing(height, width, 3, mean, std, scale, channel_order)
            module = load_model(source, weights)
            model, checks = export_torch(module, layers=layers, input_size=(height, width),
                                         rules=rule_names, preprocessing=preprocessing, labels=labels,
                                         source_name=source, opset=opset, fullgrad=fullgrad, layouts=overrides,
                                         seed=seed, score_output=score_output, compact=compact, log=log,
                                         attention_layer_scores=attention_layer_scores, **attention_options)
        for check in checks:
            if check.resolved:
                log(f"validated {check.name}: {check.kind} error {check.error:.2e} <= {check.tolerance:.0e}")
            else:
                log(f"UNVERIFIED {check.name}: the {check.kind} tolerance {check.tolerance:.0e} is as large as the "
                    "gradient itself (float32 cannot resolve the score's change); check it against the source "
                    "framework's autograd")
        from .validate import TORCH_REFERENCE_RULE_SETS

        for name in rule_names:
            if name not in TORCH_REFERENCE_RULE_SETS:
                log(f"not validated at export: camrt/input_grad/{name} (a plugin's rule set; its plugin's tests "
                    "check it against a reference implementation)")
        prefix = contract.ATTENTION_RULE_GRADIENT_PREFIX
        if any(out.name.startswith(prefix) for out in model.graph.output):
            log(f"not validated at export: {prefix}<rule set>/<map> (what the rule sets other "
                "than vanilla propagate to the attention maps; an LRP rule set's plugin tests its relevance)")
        write_model(model, output)
        click.echo(f"wrote {output}", err=True)
