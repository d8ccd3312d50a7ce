"""The contract between the exporter and the runtime: names and metadata keys of a camrt ONNX file.

Every graph input/output name and metadata key used by camrt is defined here and only here.
Both the exporters (`camrt_exporters`) and the runtime import this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

#: Bumped whenever the file layout changes incompatibly. The runtime refuses other versions.
CONTRACT_VERSION = 1
SUPPORTED_CONTRACT_VERSIONS = frozenset({1})

# --- graph inputs -------------------------------------------------------------------------
#: int64 [B]: the class to explain per sample; TOP1_TARGET means "the top-1 prediction".
TARGET_INPUT = "camrt/target"
TOP1_TARGET = -1
#: float, shaped like `camrt/logits` ([B, ...]): the cotangent dL/d(score) that seeds the backward
#: pass, so that the gradients are those of L = <seed, score>. In the file it is the tensor the
#: backward subgraph starts from, computed there as the target path's one-hot (the class axis is 1;
#: for scores of rank > 2 the one-hot is broadcast over the remaining axes). The runtime feeds it by
#: cutting the graph at this tensor, which becomes an input of the cut graphs (camrt.execution.seeded).
#: Present in files exported with `camrt export --seed` (metadata META_SEED).
SEED_TENSOR = "camrt/seed"

# --- graph outputs ------------------------------------------------------------------------
#: The differentiated score tensor [B, num_classes] (the input of a final Softmax when there is one).
LOGITS_OUTPUT = "camrt/logits"
#: int64 [B]: the target actually explained (TOP1_TARGET resolved in the graph by ArgMax).
TARGET_INDEX_OUTPUT = "camrt/target_index"
ACTIVATION_PREFIX = "camrt/act/"
GRADIENT_PREFIX = "camrt/grad/"
INPUT_GRADIENT_PREFIX = "camrt/input_grad/"
#: float [B, K]: the classifier weight row of the explained class for a layer followed by global
#: average pooling and a fully connected layer (CAM's w_k^c), gathered in the graph by the target
#: (it follows `camrt/target`, never a fed `camrt/seed`).
CAM_WEIGHTS_PREFIX = "camrt/cam_weights/"
#: float [B, C, h, w]: d score / d (node output) * bias, per bias-carrying Conv / BatchNormalization
#: node (FullGrad's bias-gradient terms; `camrt export --fullgrad`).
BIAS_GRADIENT_PREFIX = "camrt/bias_grad/"
#: float [B, heads, T, T]: attention probabilities (a Softmax output) and d score / d them.
ATTENTION_PREFIX = "camrt/attn/"
ATTENTION_GRADIENT_PREFIX = "camrt/attn_grad/"
#: float [B, heads, T, T]: d s^l / d A^l, where s^l is the model's head applied to the tokens of the
#: block that holds attention map A^l (LeGrad's layer score; `camrt export --attention-layer-scores`).
ATTENTION_LAYER_GRADIENT_PREFIX = "camrt/attn_layer_grad/"
#: float [B, heads, T, T]: what a non-vanilla rule set (`--rules`) propagates back to the attention
#: probabilities, e.g. an LRP rule set's relevance R^A; "<prefix><rule set>/<map>" (`camrt export
#: --rules ... --attention`; the vanilla gradient stays ATTENTION_GRADIENT_PREFIX).
ATTENTION_RULE_GRADIENT_PREFIX = "camrt/attn_rule_grad/"

#: Backward rule sets a file can carry input gradients for.
RULE_VANILLA = "vanilla"
RULE_GUIDED = "guided"
RULE_DECONVNET = "deconvnet"


def activation_output(layer: str) -> str:
    return ACTIVATION_PREFIX + layer


def gradient_output(layer: str) -> str:
    return GRADIENT_PREFIX + layer


def input_gradient_output(rule_set: str) -> str:
    return INPUT_GRADIENT_PREFIX + rule_set


def cam_weights_output(layer: str) -> str:
    return CAM_WEIGHTS_PREFIX + layer


def bias_gradient_output(node: str) -> str:
    return BIAS_GRADIENT_PREFIX + node


def attention_output(name: str) -> str:
    return ATTENTION_PREFIX + name


def attention_gradient_output(name: str) -> str:
    return ATTENTION_GRADIENT_PREFIX + name


def attention_layer_gradient_output(name: str) -> str:
    return ATTENTION_LAYER_GRADIENT_PREFIX + name


def attention_rule_gradient_output(rule_set: str, name: str) -> str:
    return f"{ATTENTION_RULE_GRADIENT_PREFIX}{rule_set}/{name}"


# --- metadata_props keys ------------------------------------------------------------------
META_CONTRACT_VERSION = "camrt.contract_version"
META_SOURCE = "camrt.source"  # JSON: {"framework": "torch"|"onnx", "model": "..."}
META_LAYERS = "camrt.layers"  # JSON list of layer names, first one is the default
META_DEFAULT_LAYER = "camrt.default_layer"
META_PREPROCESSING = "camrt.preprocessing"  # JSON of Preprocessing
META_LABELS = "camrt.labels"  # JSON list of class names (optional)
META_RULE_SETS = "camrt.rule_sets"  # JSON list of rule sets with input gradients
META_SCORE = "camrt.score"  # JSON: {"tensor": ..., "softmax": bool}
#: JSON {"tensor": SEED_TENSOR, "shape": the score's shape, "batch" for the batch axis}; absent: the
#: file has no seed entry (exported without --seed) and only the target path.
META_SEED = "camrt.seed"
META_EXPORTER_VERSION = "camrt.exporter_version"
META_INPUT = "camrt.input"  # name of the image input
META_CAM_LAYERS = "camrt.cam_layers"  # JSON list of the layers with a cam_weights output (GAP + FC head)
META_BIAS_TERMS = "camrt.bias_terms"  # JSON list of the nodes with a bias_grad output; absent: not exported
#: JSON {layer: LayerLayout.to_dict()}; absent (or a layer missing from it): the layer is NCHW.
META_LAYER_LAYOUTS = "camrt.layer_layouts"
#: JSON {"maps": [attention-map names, input to output], "tokens": LayerLayout.to_dict()}: the
#: attention probabilities exposed as ATTENTION_PREFIX / ATTENTION_GRADIENT_PREFIX outputs; with
#: "layer_scores": true also ATTENTION_LAYER_GRADIENT_PREFIX outputs (`Attention`).
META_ATTENTION = "camrt.attention"


#: Image-input layouts (`Preprocessing.layout`); a file without the field is NCHW.
LAYOUT_NCHW = "nchw"
LAYOUT_NHWC = "nhwc"
LAYOUTS = (LAYOUT_NCHW, LAYOUT_NHWC)
#: Layer layout of a transformer's token sequence [B, T, C] (never an image-input layout).
LAYOUT_TOKENS = "tokens"
LAYER_LAYOUTS = (LAYOUT_NCHW, LAYOUT_NHWC, LAYOUT_TOKENS)
#: Axis orders (numpy transpose, ONNX Transpose perm) between the two.
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


@dataclass(frozen=True)
class Preprocessing:
    """How the runtime turns an 8-bit image into the model input.

    x = ((pixel * scale) - mean) / std, per channel, in `channel_order`, resized to
    (height, width) without cropping; float32 in `layout`: the model's image input is NCHW
    ([B, C, H, W]) or NHWC ([B, H, W, C], as Keras/tf2onnx files have it). The runtime always
    hands methods NCHW batches and input gradients; it transposes at the model's input only.
    One mean/std value per channel: three (RGB or BGR) or one (the image's luma, for grayscale models).
    """

    height: int
    width: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    channel_order: str = "rgb"
    layout: str = LAYOUT_NCHW

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_json(self) -> str:
        # NCHW files leave the field out: they stay readable by runtimes that predate it, which
        # refuse an NHWC file as malformed instead of feeding it NCHW.
        data = asdict(self)
        if data["layout"] == LAYOUT_NCHW:
            del data["layout"]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        data = json.loads(text)
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        return cls(**data)


@dataclass(frozen=True)
class LayerLayout:
    """How an exposed layer tensor maps onto a [B, C, h, w] feature map.

    nchw: as is; nhwc: [B, h, w, C]; tokens: [B, T, C] with T = len(extra_tokens) + h * w, the
    patch tokens in row-major grid order and the extra tokens (class, distillation, registers) at
    the positions `extra_tokens`.
    """

    layout: str = LAYOUT_NCHW
    grid: tuple[int, int] | None = None
    extra_tokens: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        data = {"layout": self.layout}
        if self.layout == LAYOUT_TOKENS:
            data.update(grid=list(self.grid), extra_tokens=list(self.extra_tokens))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LayerLayout":
        grid = data.get("grid")
        return cls(data["layout"], tuple(grid) if grid is not None else None, tuple(data.get("extra_tokens", ())))


@dataclass(frozen=True)
class Attention:
    """The attention maps a file exposes (META_ATTENTION): their names, input to output, and the
    token sequence they attend over (a `LayerLayout` of layout tokens: grid and extra tokens)."""

    maps: tuple[str, ...]
    tokens: LayerLayout
    #: Whether each map also has LeGrad's layer-score gradient (ATTENTION_LAYER_GRADIENT_PREFIX).
    layer_scores: bool = False

    def to_json(self) -> str:
        data = {"maps": list(self.maps), "tokens": self.tokens.to_dict()}
        if self.layer_scores:
            data["layer_scores"] = True
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "Attention":
        data = json.loads(text)
        return cls(tuple(str(name) for name in data["maps"]), LayerLayout.from_dict(data["tokens"]),
                   bool(data.get("layer_scores", False)))


@dataclass
class ContractInfo:
    """Everything the metadata of a camrt file says, parsed."""

    version: int
    input_name: str
    layers: list[str]
    default_layer: str | None
    preprocessing: Preprocessing
    rule_sets: list[str]
    labels: list[str] | None = None
    source: dict = field(default_factory=dict)
    score: dict = field(default_factory=dict)
    exporter_version: str = ""
    #: Layers with CAM weights; None when the file predates CAM (no such metadata).
    cam_layers: list[str] | None = None
    #: Nodes with FullGrad bias-gradient terms; None when the file was exported without them.
    bias_terms: list[str] | None = None
    #: The exposed attention maps; None when the file was exported without `--attention`.
    attention: Attention | None = None
    #: The seed entry (META_SEED: {"tensor", "shape"}); None when the file was exported without --seed.
    seed: dict | None = None
    #: The layout of each layer the file records (META_LAYER_LAYOUTS); a layer missing is NCHW.
    layer_layouts: dict[str, LayerLayout] = field(default_factory=dict)

    def layer_layout(self, layer: str) -> LayerLayout:
        return self.layer_layouts.get(layer, LayerLayout())
