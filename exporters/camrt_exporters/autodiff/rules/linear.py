"""Backward rules of Conv, ConvTranspose, Gemm, MatMul and Einsum."""

from __future__ import annotations

import string

import numpy as np

from ...errors import ExportError
from ..graph import attribute
from ..reverse import RuleContext, RuleTable, registering

RULES: RuleTable = {}
rule = registering(RULES)


def _only_data_gradient(ctx: RuleContext, node, what: str) -> None:
    if any(ctx.needs(i) for i in range(1, len(node.input))):
        raise ExportError(
            f"node {node.name!r} ({node.op_type}): gradients w.r.t. {what} are not supported; "
            "camrt differentiates activations, with the weights held constant."
        )


def _auto_pad(node) -> str:
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    return auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad


def _fixed_pads(node, auto_pad: str, n: int) -> list[int] | None:
    """The pads when auto_pad computes none (NOTSET: the pads attribute, VALID: zeros), else None."""
    if auto_pad in ("NOTSET", ""):
        return list(attribute(node, "pads", [0] * (2 * n)))
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return None


def explicit_pads(ctx: RuleContext, node, in_spatial, kernel, strides, dilations) -> list[int]:
    """The pads of a Conv/Pool node as explicit [begins..., ends...], resolving auto_pad."""
    auto_pad = _auto_pad(node)
    fixed = _fixed_pads(node, auto_pad, len(in_spatial))
    if fixed is not None:
        return fixed
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


@rule("Conv")
def conv(ctx: RuleContext, node, grads):
    """dX of a convolution: Conv with the flipped, transposed kernel (a copy) for stride 1; else, or when
    `ctx.compact`, ConvTranspose on the forward's own weights."""
    _only_data_gradient(ctx, node, "Conv weights or bias")
    x, w = node.input[0], node.input[1]
    g = grads[0]
    x_shape = ctx.static_shape(x)
    spatial = list(x_shape[2:])
    n = len(spatial)
    weight = ctx.value(w)
    kernel = list(attribute(node, "kernel_shape", None) or ctx.static_shape(w)[2:])
    strides = list(attribute(node, "strides", [1] * n))
    dilations = list(attribute(node, "dilations", [1] * n))
    group = attribute(node, "group", 1)
    pads = explicit_pads(ctx, node, spatial, kernel, strides, dilations)
    out_spatial = ctx.static_shape(node.output[0])[2:]
    flipped_pads = [d * (k - 1) - p for d, k, p in zip(dilations * 2, kernel * 2, pads)]
    if weight is not None and not ctx.compact and all(s == 1 for s in strides) and min(flipped_pads) >= 0:
        m, c_per_group = weight.shape[:2]
        grouped = weight.reshape(group, m // group, c_per_group, *kernel)
        transposed = np.swapaxes(grouped, 1, 2).reshape(group * c_per_group, m // group, *kernel)
        flipped = np.ascontiguousarray(transposed[(slice(None), slice(None)) + (slice(None, None, -1),) * n])
        return [ctx.emit("Conv", [g, ctx.const(flipped, like=x)], pads=flipped_pads,
                         dilations=dilations, group=group, kernel_shape=kernel)] + [None] * (len(node.input) - 1)
    output_padding = []
    for size, out, k, s, d, pb, pe in zip(spatial, out_spatial, kernel, strides, dilations, pads[:n], pads[n:]):
        output_padding.append(size - ((out - 1) * s + d * (k - 1) + 1 - pb - pe))
    if min(output_padding) < 0:
        raise ExportError(f"node {node.name!r} (Conv): inconsistent static shapes for the backward pass")
    return [ctx.emit("ConvTranspose", [g, w], strides=strides, pads=pads, dilations=dilations,
                     group=group, kernel_shape=kernel, output_padding=output_padding)] + [None] * (len(node.input) - 1)


def _swap_last_two(ctx: RuleContext, name: str) -> str:
    value = ctx.value(name)
    if value is not None:
        return ctx.const(np.swapaxes(value, -1, -2), like=name)
    rank = ctx.index.rank(name)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.emit("Transpose", [name], perm=perm)


@rule("MatMul")
def matmul(ctx: RuleContext, node, grads):
    a, b = node.input
    y, g = node.output[0], grads[0]
    if (ctx.index.rank(a) or 0) < 2 or (ctx.index.rank(b) or 0) < 2:
        raise ExportError(f"node {node.name!r} (MatMul): 1-D operands are not supported by the backward rule")
    grad_a = grad_b = None
    if ctx.needs(0):
        grad_a = ctx.unbroadcast(ctx.emit("MatMul", [g, _swap_last_two(ctx, b)]), a, y)
    if ctx.needs(1):
        grad_b = ctx.unbroadcast(ctx.emit("MatMul", [_swap_last_two(ctx, a), g]), b, y)
    return [grad_a, grad_b]


@rule("Gemm")
def gemm(ctx: RuleContext, node, grads):
    """Y = alpha * op(A) @ op(B) + beta * C."""
    a, b = node.input[:2]
    y, g = node.output[0], grads[0]
    alpha = attribute(node, "alpha", 1.0)
    beta = attribute(node, "beta", 1.0)
    trans_a = attribute(node, "transA", 0)
    trans_b = attribute(node, "transB", 0)
    out: list[str | None] = [None] * len(node.input)
    if ctx.needs(0):  # d op(A) = alpha * g @ op(B)^T
        grad = ctx.emit("Gemm", [g, b], alpha=alpha, transB=0 if trans_b else 1)
        out[0] = ctx.emit("Transpose", [grad], perm=[1, 0]) if trans_a else grad
    if ctx.needs(1):  # d op(B) = alpha * op(A)^T @ g
        grad = ctx.emit("Gemm", [a, g], alpha=alpha, transA=0 if trans_a else 1)
        out[1] = ctx.emit("Transpose", [grad], perm=[1, 0]) if trans_b else grad
    if len(node.input) > 2 and ctx.needs(2):
        out[2] = ctx.unbroadcast(ctx.mul(g, ctx.const(beta, like=y)), node.input[2], y)
    return out


def _conv_transpose_pads(ctx: RuleContext, node, n: int, kernel, strides, dilations, output_padding) -> list[int]:
    """Explicit [begins..., ends...] pads of a ConvTranspose. auto_pad SAME_*: the output is
    input * stride and the total padding goes mostly to the end (SAME_UPPER) or the begin
    (SAME_LOWER), as onnxruntime and the reference evaluator do it."""
    if attribute(node, "output_shape", None):
        raise ExportError(f"node {node.name!r} (ConvTranspose): the output_shape attribute has no backward rule; "
                          "export the model with explicit pads and output_padding")
    auto_pad = _auto_pad(node)
    fixed = _fixed_pads(node, auto_pad, n)
    if fixed is not None:
        return fixed
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ExportError(f"node {node.name!r} (ConvTranspose): unknown auto_pad {auto_pad!r}")
    spatial = ctx.static_shape(node.input[0])[2:]
    totals = [(i - 1) * s + op + (k - 1) * d + 1 - i * s
              for i, s, op, k, d in zip(spatial, strides, output_padding, kernel, dilations)]
    if min(totals) < 0:
        raise ExportError(f"node {node.name!r} (ConvTranspose): auto_pad {auto_pad!r} with a kernel smaller than "
                          "the stride has no backward rule; export the model with explicit pads")
    begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
    return begins + [t - b for t, b in zip(totals, begins)]


@rule("ConvTranspose")
def conv_transpose(ctx: RuleContext, node, grads):
    """ConvTranspose is the adjoint of the convolution with the same W, so dX = Conv(g, W): W's layout
    [C_in, C_out/group, k...] is Conv's [M, C/group, k...], with the same strides, dilations, group and
    begin pads; the end pads less output_padding (g cropped at the end where that is negative)."""
    _only_data_gradient(ctx, node, "ConvTranspose weights or bias")
    x, w = node.input[0], node.input[1]
    n = ctx.index.rank(x) - 2
    kernel = list(attribute(node, "kernel_shape", None) or ctx.static_shape(w)[2:])
    strides = list(attribute(node, "strides", [1] * n))
    dilations = list(attribute(node, "dilations", [1] * n))
    output_padding = list(attribute(node, "output_padding", [0] * n))
    pads = _conv_transpose_pads(ctx, node, n, kernel, strides, dilations, output_padding)
    ends = [end - extra for end, extra in zip(pads[n:], output_padding)]
    g = grads[0]
    if min(ends) < 0:  # output_padding beyond the end pads: those outputs see no input
        big = np.iinfo(np.int64).max
        g = ctx.emit("Slice", [g, ctx.ints([0] * n), ctx.ints([e if e < 0 else big for e in ends]),
                               ctx.ints(list(range(2, n + 2)))])
    return [ctx.emit("Conv", [g, w], strides=strides, dilations=dilations, group=attribute(node, "group", 1),
                     kernel_shape=kernel, pads=pads[:n] + [max(e, 0) for e in ends])] + [None] * (len(node.input) - 1)


def _einsum_terms(ctx: RuleContext, node) -> tuple[list[str], str]:
    """The operand subscripts and the output subscript of an Einsum (implicit output: the ellipsis, then
    the letters that occur once, sorted), an ellipsis spelled out in spare letters (right-aligned, as
    it broadcasts)."""
    equation = attribute(node, "equation")
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    operands, arrow, output = equation.partition("->")
    terms = operands.split(",")
    if not arrow:
        letters = "".join(terms).replace(".", "")
        output = ("..." if "..." in operands else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if "..." in equation:
        terms, output = _spell_out_ellipsis(ctx, node, equation, terms, output)
    for term in terms:
        if len(set(term)) != len(term):
            raise ExportError(f"node {node.name!r} (Einsum): operand {term!r} of equation {equation!r} repeats an "
                              "index (a diagonal), which the backward rule does not support")
    return terms, output


def _spell_out_ellipsis(ctx: RuleContext, node, equation: str, terms: list[str], output: str) -> tuple[list[str], str]:
    """terms and output with "..." replaced by letters the equation does not use, as many as each operand's
    rank leaves (the output takes the widest); refused where a static size-1 dimension would broadcast."""
    spare = [c for c in string.ascii_uppercase + string.ascii_lowercase if c not in equation]
    widths = []
    for term, name in zip(terms, node.input):
        rank = ctx.index.rank(name)
        if "..." in term and rank is None:
            raise ExportError(f"node {node.name!r} (Einsum): the rank of {name!r} is unknown, so the ellipsis of "
                              f"{equation!r} cannot be spelled out; run ONNX shape inference on the model first")
        widths.append(rank - (len(term) - 3) if "..." in term else 0)
    letters = "".join(spare[:max(widths)])
    terms = [term.replace("...", letters[len(letters) - width:]) for term, width in zip(terms, widths)]
    extents: dict[str, set[int]] = {}
    for term, name in zip(terms, node.input):
        for letter, dim in zip(term, ctx.shape(name) or ()):
            if letter in letters and isinstance(dim, int):
                extents.setdefault(letter, set()).add(dim)
    if any(len(dims) > 1 for dims in extents.values()):
        raise ExportError(f"node {node.name!r} (Einsum): equation {equation!r} broadcasts a size-1 dimension of its "
                          "ellipsis, which the backward rule does not support")
    return terms, output.replace("...", letters)


@rule("Einsum")
def einsum(ctx: RuleContext, node, grads):
    """Y = einsum(X_1, ..., X_n) is linear in each operand: dX_i = einsum(g, X_j for j != i) onto X_i's
    subscripts, then broadcast (Expand) along the letters only X_i has (the forward summed them)."""
    terms, output = _einsum_terms(ctx, node)
    out: list[str | None] = []
    for i, (term, name) in enumerate(zip(terms, node.input)):
        if not ctx.needs(i):
            out.append(None)
            continue
        others = [(t, other) for j, (t, other) in enumerate(zip(terms, node.input)) if j != i]
        reachable = set(output).union(*(set(t) for t, _ in others))
        kept = "".join(c for c in term if c in reachable)
        equation = ",".join([output, *(t for t, _ in others)]) + "->" + kept
        grad = ctx.emit("Einsum", [grads[0], *(other for _, other in others)], equation=equation)
        if kept != term:
            summed = [axis for axis, c in enumerate(term) if c not in reachable]
            grad = ctx.emit("Expand", [ctx.emit("Unsqueeze", [grad, ctx.ints(summed)]), ctx.shape_of(name)])
        out.append(grad)
    return out
