"""Distillation losses: the generalized Jensen-Shannon divergence becomes ``liger::jsd``, or
``liger::fused_linear_jsd`` when both sides come from an lm_head whose logits nothing else reads; any other
``F.kl_div`` becomes ``liger::kl_div``.

The JSD is matched as distillation trainers write it: a weighted sum of two ``kl_div(M, X, log_target=True)``
against one log-mixture M of the student's and teacher's log-probabilities, with M spelled

- ``log(w_t * exp(t) + w_s * exp(s))`` in any arrangement of the weights (``0.5 * (s.exp() + t.exp())``), or
- ``logsumexp(stack([s + log(w_s), t + log(w_t)]), 0)`` / ``logaddexp(s + log(w_s), t + log(w_t))`` (TRL's
  GKD trainer, whose weights are 0-d tensors made from beta: constants all the same);

the weights summing to 1, each KL term weighted as its side in M (then the sum is c * JSD with beta = w_t), and
the KLs reduced by ``sum`` / ``batchmean`` / ``mean``, or unreduced and the weighted sum then summed or averaged
whole. An unreduced sum may first keep the rows whose label is not an ignore index, ``jsd[labels != -100].sum()``
(TRL's GKD trainer; Dynamo traces that masking only with
``torch._dynamo.config.capture_dynamic_output_shape_ops = True``, and otherwise breaks the graph there): the op
takes the labels and skips those rows. What follows the JSD (a division by the token count) stays in the graph. The arithmetic must be in fp32:
an upcast of 16-bit log-probabilities is taken into the op, which reads them as they are.

Fused: each side is ``log_softmax(linear(h, W) [.float()] [/ T], -1)`` with one temperature T on both sides, no
bias, and the teacher's h and W need no gradient.

Near-misses: the JSD arithmetic in 16 bits, KL terms weighted unlike the mixture, a mixture whose weights do
not sum to 1, and ``kl_div`` with legacy ``size_average`` / ``reduce``, shapes that broadcast, or
``reduction="none"`` (elementwise: Inductor fuses it with what reads it).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from liger_compile.ops._library import FLOAT_DTYPES
from liger_compile.passes.graph import (
    InexactMatch,
    Rewriter,
    autocast_explicitly,
    canonical,
    constant,
    derived,
    dtype_of,
    find_matches,
    reduced_dims,
    same_shape,
    tensor_meta,
)
from liger_compile.passes.manager import Recorder

FAMILY = "divergence"
_KL_DIV = torch.ops.liger.kl_div.default
_JSD = torch.ops.liger.jsd.default
_FUSED_JSD = torch.ops.liger.fused_linear_jsd.default
_SCALAR_REDUCTIONS = ("sum", "mean", "batchmean")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class _Jsd:
    final: fx.Node  # the node whose value is scale * JSD
    teacher: fx.Node  # log-probabilities (or their 16-bit source), the mixture's weight-beta side
    student: fx.Node
    beta: float
    scale: float
    nodes: list[fx.Node]
    fused: tuple | None = None  # (student hidden, student weight, teacher hidden, teacher weight, temperature)
    why_not_fused: str = ""
    fused_nodes: list[fx.Node] = field(default_factory=list)
    labels: fx.Node | None = None  # rows labelled ignore_index are left out of the sum
    ignore_index: int = -100
    size_checks: list[fx.Node] = field(default_factory=list)  # Dynamo's asserts on the masked rows' count


@dataclass
class _KlDiv:
    node: fx.Node
    input: fx.Node
    target: fx.Node
    reduction: str
    log_target: bool
    dtype: torch.dtype  # the result's: fp32 on 16-bit operands under autocast

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.node]


def apply(graph: fx.Graph, record: Recorder) -> None:
    rewriter = Rewriter(graph)
    for match in find_matches(graph, record, _jsd_at):
        record.rewrite(match.final, "fused linear jsd" if match.fused else f"jsd ({match.why_not_fused})")
        _replace_jsd(graph, rewriter, match)
    for match in find_matches(graph, record, _kl_div_at):
        record.rewrite(match.node, f"kl_div {match.reduction}")
        with graph.inserting_before(match.node):
            # autocast computes kl_div in fp32 on 16-bit operands
            operands = autocast_explicitly(graph, [match.input, match.target], match.dtype)
        rewriter.replace(match.node, _KL_DIV, (*operands, match.reduction, match.log_target), match.nodes)


def _replace_jsd(graph: fx.Graph, rewriter: Rewriter, match: _Jsd) -> None:
    if match.fused is None:
        target, args = _JSD, (match.student, match.teacher, match.labels, match.beta, match.ignore_index, "sum")
    else:
        *lm_heads, temperature = match.fused
        operands = []
        with graph.inserting_before(match.final):
            for hidden, weight, dtype in lm_heads:
                rows = derived(graph, torch.reshape, (hidden, (-1, tensor_meta(hidden).shape[-1])))
                operands.extend(autocast_explicitly(graph, [rows, weight], dtype))
            labels = None if match.labels is None else derived(graph, torch.reshape, (match.labels, (-1,)))
        target = _FUSED_JSD
        args = (*operands, labels, match.beta, match.ignore_index, temperature, "sum", 0)
    for check in reversed(match.size_checks):  # they read the masked values, which are no longer computed
        graph.erase_node(check)
    new = rewriter.replace(match.final, target, args, match.nodes + match.fused_nodes)
    if match.scale != 1.0:
        with graph.inserting_after(new):
            scaled = graph.call_function(torch.mul, (new, match.scale))
        new.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        scaled.meta.update(new.meta)


# --- the JSD -------------------------------------------------------------------------------------------------

def _jsd_at(node: fx.Node) -> _Jsd | None:
    call = canonical(node)
    if call is None:
        return None
    whole = call.op in ("sum", "mean") and call.get("dim") is None and call.get("dtype") is None
    masked = _unignored_rows(call["input"], node) if whole else None
    if whole:  # the sum or mean of unreduced KL terms, maybe of the rows not ignored
        terms, offset, interior = _linear_terms(call["input"] if masked is None else masked[0])
    elif call.op in ("add", "sub"):
        terms, offset, interior = _linear_terms(node)
    else:
        return None
    kl_calls = [canonical(term) for term in terms]
    if len(terms) != 2 or offset != 0 or any(c is None or c.op != "kl_div" for c in kl_calls):
        return None
    reductions = {c.get("reduction", "mean") for c in kl_calls}
    if whole != (reductions == {"none"}):
        return None  # unreduced terms not yet summed (their sum is matched), or reduced ones summed again
    mixture = kl_calls[0]["input"]
    if kl_calls[1]["input"] is not mixture or any(c.get("log_target") is not True for c in kl_calls):
        return None
    weights, mixture_nodes = _mixture_weights(mixture)
    sides = [c["target"] for c in kl_calls]
    if weights is None or set(weights) != set(sides) or len(sides) != 2 or sides[0] is sides[1]:
        return None
    if any(c.get("size_average") is not None or c.get("reduce") is not None for c in kl_calls):
        raise InexactMatch("kl_div with legacy size_average / reduce arguments")
    if len(reductions) != 1:
        raise InexactMatch(f"the two KL terms are reduced differently: {sorted(reductions)}")
    (first, second), (c_first, c_second) = sides, terms.values()
    w_first, w_second = weights[first], weights[second]
    if not (0 < w_first < 1 and math.isclose(w_first + w_second, 1.0, rel_tol=1e-6)):
        raise InexactMatch(f"the mixture's weights {w_first:g} and {w_second:g} do not sum to 1")
    if not math.isclose(c_first / w_first, c_second / w_second, rel_tol=1e-6):
        raise InexactMatch(f"the KL terms' weights ({c_first:g}, {c_second:g}) are not the mixture's "
                           f"({w_first:g}, {w_second:g}): not a Jensen-Shannon divergence")
    metas = [tensor_meta(side) for side in sides] + [tensor_meta(mixture)]
    if any(meta is None for meta in metas):
        raise InexactMatch("no tensor metadata for the log-probabilities")
    if not (same_shape(metas[0].shape, metas[1].shape) and same_shape(metas[0].shape, metas[2].shape)):
        raise InexactMatch("the log-probabilities and the mixture differ in shape (broadcast)")
    if {meta.dtype for meta in metas} != {torch.float32}:
        raise InexactMatch(f"the JSD arithmetic is in {metas[2].dtype}; the op computes in fp32")
    operator_name = call.op if whole else reductions.pop()
    if masked is not None and operator_name != "sum":
        raise InexactMatch("the mean of the rows not ignored divides by their count, known only when it runs: the "
                           "op sums them (sum, then divide in the graph)")
    divisor = _divisor(operator_name, metas[0])
    teacher, student, beta = first, second, w_first
    if metas[0].requires_grad and not metas[1].requires_grad:  # the side with a gradient is the student
        teacher, student, beta = second, first, w_second
    nodes = [node, *interior, *terms, *mixture_nodes]
    match = _Jsd(node, teacher, student, beta, c_first / w_first / divisor, nodes)
    if masked is not None:
        _, match.labels, match.ignore_index, selection, match.size_checks = masked
        match.nodes.append(selection)
    _fuse(match)
    if match.fused is None:
        match.teacher, match.student = (_absorb_upcast(side, match.nodes) for side in (teacher, student))
    return match


_NOT_EQUAL = (operator.ne, torch.ne, torch.Tensor.ne)
_COMPARISONS = (operator.ge, operator.gt, operator.le, operator.lt, operator.eq, operator.ne)


def _unignored_rows(node, reducer: fx.Node):
    """(values, labels, ignore_index, the selection node, its size checks) when `node` is
    ``values[labels != ignore_index]`` with an int constant, labels of an integer dtype, one per row of values
    (all dims but the last), and nothing but `reducer` and Dynamo's asserts on its row count reads the selection."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and len(node.args) == 2 and isinstance(node.args[1], fx.Node)):
        return None
    values, mask = node.args
    if mask.op == "call_function" and mask.target in _NOT_EQUAL or mask.op == "call_method" and mask.target in (
            "ne", "__ne__"):
        operands = list(mask.args)
    else:
        return None
    if len(operands) != 2 or mask.kwargs:
        return None
    labels, ignore_index = (operands if isinstance(operands[0], fx.Node) else operands[::-1])
    if not isinstance(labels, fx.Node) or type(ignore_index) is not int:
        return None
    labels_meta, values_meta = tensor_meta(labels), tensor_meta(values)
    if (labels_meta is None or values_meta is None or labels_meta.dtype not in (torch.int64, torch.int32)
            or values_meta.dim() < 2 or not same_shape(labels_meta.shape, values_meta.shape[:-1])):
        return None
    size_checks = _size_checks(node, reducer)
    return None if size_checks is None else (values, labels, ignore_index, node, size_checks)


def _size_checks(selection: fx.Node, reducer: fx.Node) -> list[fx.Node] | None:
    """The nodes, in graph order, that only check `selection`'s (data-dependent) row count, when nothing but them
    and `reducer` reads it; None otherwise."""
    checks, pending = [], [user for user in selection.users if user is not reducer]
    while pending:
        user = pending.pop()
        if user in checks:
            continue
        size_query = user.target is torch.ops.aten.sym_size.int and user.args[0] is selection
        if not (size_query or user.target in _COMPARISONS or user.target is torch.ops.aten._assert_scalar.default):
            return None
        checks.append(user)
        pending.extend(user.users)
    order = {n: i for i, n in enumerate(selection.graph.nodes)}
    return sorted(checks, key=order.__getitem__)


def _divisor(reduction: str, meta: torch.Tensor) -> float:
    """What ``kl_div``'s reduction (or ``Tensor.mean``) divides the sum by, from a static shape."""
    size = {"sum": 1, "batchmean": meta.shape[0] if meta.dim() else 1, "mean": meta.numel()}[reduction]
    if not isinstance(size, int):
        raise InexactMatch(f"the {reduction} divides by a dynamic size")
    return float(size)


def _linear_terms(node: fx.Node) -> tuple[dict[fx.Node, float], float, list[fx.Node]]:
    """`node` as ``sum_i c_i * term_i + offset`` through add, sub, neg and products or quotients by constants:
    ({term: c}, offset, the add / mul / ... nodes in between)."""
    call = canonical(node)
    value = constant(node)
    if value is not None:
        return {}, value, []
    if call is not None and call.op in ("add", "sub") and call.get("alpha", 1) == 1:
        left, left_offset, left_nodes = _linear_terms(call["input"])
        right, right_offset, right_nodes = _linear_terms(call["other"])
        sign = 1.0 if call.op == "add" else -1.0
        for term, coefficient in right.items():
            left[term] = left.get(term, 0.0) + sign * coefficient
        return left, left_offset + sign * right_offset, [node, *left_nodes, *right_nodes]
    if call is not None and call.op in ("mul", "div", "neg") and call.get("rounding_mode") is None:
        operands = [call["input"]] if call.op == "neg" else [call["input"], call["other"]]
        factors = [constant(o) for o in operands]
        if call.op == "neg":
            factor, inner = -1.0, operands[0]
        elif call.op == "div" and factors[1] not in (None, 0.0):
            factor, inner = 1.0 / factors[1], operands[0]
        elif call.op == "mul" and (factors[0] is None) != (factors[1] is None):
            factor, inner = (factors[1], operands[0]) if factors[0] is None else (factors[0], operands[1])
        else:
            return {node: 1.0}, 0.0, []
        if isinstance(inner, fx.Node):
            terms, offset, nodes = _linear_terms(inner)
            return {t: c * factor for t, c in terms.items()}, offset * factor, [node, *nodes]
    return {node: 1.0}, 0.0, []


def _mixture_weights(mixture: fx.Node) -> tuple[dict[fx.Node, float] | None, list[fx.Node]]:
    """({x: w_x}, nodes) when `mixture` is log(sum_x w_x exp(x)) over two log-probability tensors x, in one of the
    spellings the module docstring lists; (None, []) otherwise."""
    call = canonical(mixture)
    if call is None:
        return None, []
    if call.op == "log":
        terms, offset, nodes = _linear_terms(call["input"])
        exps = {term: canonical(term) for term in terms}
        if offset != 0 or len(terms) != 2 or any(c is None or c.op != "exp" for c in exps.values()):
            return None, []
        return {c["input"]: terms[term] for term, c in exps.items()}, [mixture, *nodes, *terms]
    if call.op == "logsumexp":
        stack, stacked = canonical(call["input"]), tensor_meta(call["input"])
        if (stack is None or stack.op != "stack" or stack.get("dim", 0) != 0 or call.get("keepdim")
                or stacked is None or call.get("dim") is None or len(stack["tensors"]) != 2
                or reduced_dims(call["dim"], stacked.dim()) != (0,)):
            return None, []
        shifted, nodes = stack["tensors"], [mixture, call["input"]]
    elif call.op == "logaddexp":
        shifted, nodes = [call["input"], call["other"]], [mixture]
    else:
        return None, []
    weights = {}
    for operand in shifted:
        terms, log_weight, inner = _linear_terms(operand)
        if len(terms) != 1 or next(iter(terms.values())) != 1.0:
            return None, []
        weights[next(iter(terms))] = math.exp(log_weight)
        nodes.extend(inner)
    return weights, nodes


def _absorb_upcast(side: fx.Node, nodes: list[fx.Node]) -> fx.Node:
    """The 16-bit tensor `side` upcasts, when the match alone reads the upcast (the op reads 16 bits as they are)."""
    call = canonical(side)
    source = tensor_meta(call["input"]) if call is not None and call.op == "cast" else None
    if source is None or source.dtype not in _HALF_DTYPES or not set(side.users) <= set(nodes):
        return side
    nodes.append(side)
    return call["input"]


def _fuse(match: _Jsd) -> None:
    """Take both sides' lm_heads into the match when the log-probabilities are ``log_softmax(linear(h, W) / T)``
    that nothing else reads; otherwise say why not."""
    interior = [n for n in match.nodes if n is not match.final]
    chains = [_lm_head_chain(side) for side in (match.student, match.teacher)]
    if any(chain is None for chain in chains):
        match.why_not_fused = "log-probabilities not made by log_softmax(linear(h, W) [/ T])"
        return
    (student_linear, student_t, student_nodes), (teacher_linear, teacher_t, teacher_nodes) = chains
    absorbed = set(match.nodes) | set(match.size_checks) | set(student_nodes) | set(teacher_nodes)
    if any(not set(n.users) <= absorbed for n in interior + student_nodes + teacher_nodes):
        match.why_not_fused = "the log-probabilities or logits are also used elsewhere"
        return
    if student_t != teacher_t:
        match.why_not_fused = f"the two sides have different temperatures ({student_t:g}, {teacher_t:g})"
        return
    teacher_metas = [tensor_meta(t) for t in teacher_linear[:2]]
    if any(meta.requires_grad for meta in teacher_metas):
        match.why_not_fused = "the teacher's lm_head input or weight needs a gradient"
        return
    if not same_shape(tensor_meta(student_linear[0]).shape[:-1], teacher_metas[0].shape[:-1]):
        match.why_not_fused = "the student's and teacher's hidden states have different leading dims"
        return
    match.fused = (student_linear, teacher_linear, student_t)
    match.fused_nodes = student_nodes + teacher_nodes


def _lm_head_chain(side: fx.Node):
    """((h, W, the linear's dtype), T, nodes) when `side` is ``log_softmax(linear(h, W) [.float()] [/ T], -1)`` in
    fp32, with no bias (and maybe a ``.float()`` of it that changes nothing)."""
    nodes, call = [], canonical(side)
    if call is not None and call.op == "cast" and getattr(tensor_meta(call["input"]), "dtype", None) == torch.float32:
        nodes, side, call = [side], call["input"], canonical(call["input"])
    meta = tensor_meta(side)
    if call is None or call.op != "log_softmax" or meta is None or call.get("dtype") is not None:
        return None
    if reduced_dims(call.get("dim"), meta.dim()) != (meta.dim() - 1,) or meta.dtype != torch.float32:
        return None
    nodes, node, temperature = [*nodes, side], call["input"], 1.0
    step = canonical(node)
    if step is not None and step.op == "div" and constant(step.get("other")) and step.get("rounding_mode") is None:
        temperature = constant(step["other"])
        nodes.append(node)
        node, step = step["input"], canonical(step["input"])
    if step is not None and step.op == "cast" and tensor_meta(node).dtype == torch.float32:
        nodes.append(node)
        node, step = step["input"], canonical(step["input"])
    if step is None or step.op != "linear" or step.get("bias") is not None or temperature <= 0:
        return None
    hidden, weight = tensor_meta(step["input"]), tensor_meta(step["weight"])
    if (hidden is None or weight is None or weight.dim() != 2 or hidden.dim() < 1 or hidden.dtype != weight.dtype
            or hidden.dtype not in FLOAT_DTYPES or not same_shape(hidden.shape[-1:], weight.shape[1:])
            or dtype_of(node) not in FLOAT_DTYPES):
        return None
    nodes.append(node)
    return (step["input"], step["weight"], dtype_of(node)), temperature, nodes


# --- kl_div alone ----------------------------------------------------------------------------------------------

def _kl_div_at(node: fx.Node) -> _KlDiv | None:
    call = canonical(node)
    if call is None or call.op != "kl_div":
        return None
    if call.get("size_average") is not None or call.get("reduce") is not None:
        raise InexactMatch("legacy size_average / reduce arguments")
    reduction, log_target = call.get("reduction", "mean"), call.get("log_target", False)
    if reduction not in _SCALAR_REDUCTIONS or not isinstance(log_target, bool):
        raise InexactMatch(f"reduction {reduction!r}: elementwise (or not a constant), left to Inductor")
    input_meta, target_meta = tensor_meta(call["input"]), tensor_meta(call.get("target"))
    if input_meta is None or target_meta is None:
        raise InexactMatch("no tensor metadata for the input or the target")
    if not same_shape(input_meta.shape, target_meta.shape) or input_meta.dim() == 0:
        raise InexactMatch(f"input {tuple(input_meta.shape)} and target {tuple(target_meta.shape)} broadcast")
    if input_meta.dtype not in FLOAT_DTYPES or target_meta.dtype not in FLOAT_DTYPES:
        raise InexactMatch(f"dtypes {input_meta.dtype} / {target_meta.dtype} are not supported")
    dtype = dtype_of(node)
    if dtype not in (torch.promote_types(input_meta.dtype, target_meta.dtype), torch.float32):
        raise InexactMatch(f"the result is {dtype} for {input_meta.dtype} / {target_meta.dtype} operands")
    return _KlDiv(node, call["input"], call["target"], reduction, log_target, dtype)
