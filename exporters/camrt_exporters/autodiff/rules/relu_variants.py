"""Modified ReLU backward rules for the `guided` and `deconvnet` rule sets.

Guided backpropagation (Springenberg et al., 2015, "Striving for Simplicity", eq. in Fig. 1):
R_l = 1[f_l > 0] * 1[R_{l+1} > 0] * R_{l+1}.
Deconvnet (Zeiler & Fergus, 2014, sec. 2.1): R_l = max(R_{l+1}, 0), ignoring the forward switch.
Both only replace the Relu op, as pytorch-grad-cam and Captum replace only ReLU modules.
"""

from __future__ import annotations

from ..reverse import RuleContext, RuleTable
from .elementwise import _mask


def guided_relu(ctx: RuleContext, node, grads):
    y = node.output[0]
    positive_forward = _mask(ctx, "Greater", y, ctx.const(0.0, like=y), y)
    return [ctx.mul(ctx.emit("Relu", [grads[0]]), positive_forward)]


def deconvnet_relu(ctx: RuleContext, node, grads):
    return [ctx.emit("Relu", [grads[0]])]


GUIDED_RULES: RuleTable = {"Relu": guided_relu}
DECONVNET_RULES: RuleTable = {"Relu": deconvnet_relu}
