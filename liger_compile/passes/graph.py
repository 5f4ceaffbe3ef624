"""Reading Dynamo FX graphs: one canonical view of the many spellings of an op, meta, and rewriting.

Dynamo records what the user wrote: ``x * y`` is ``operator.mul``, ``torch.mul(x, y)`` is ``torch.mul`` and
``x.mul(y)`` is a ``call_method``. `canonical` maps all of them to one `Call` with named operands, so the
matchers only ever see ``Call("mul", {"input": x, "other": y})``.
"""

from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import CheckpointPolicy

# Canonical name -> positional parameter names (keyword arguments keep their own names).
_PARAMETERS: dict[str, tuple[str, ...]] = {
    "add": ("input", "other"),
    "sub": ("input", "other"),
    "mul": ("input", "other"),
    "div": ("input", "other"),
    "pow": ("input", "exponent"),
    "square": ("input",),
    "sqrt": ("input",),
    "rsqrt": ("input",),
    "reciprocal": ("input",),
    "mean": ("input", "dim", "keepdim"),
    "var": ("input", "dim", "unbiased", "keepdim"),
    "cast": ("input",),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "silu": ("input", "inplace"),
    "gelu": ("input", "approximate"),
    "sigmoid": ("input",),
    "tanh": ("input",),
    "chunk": ("input", "chunks", "dim"),
    "split": ("input", "split_size", "dim"),
    "neg": ("input",),
    "cat": ("tensors", "dim"),
    "contiguous": ("input",),
    "linear": ("input", "weight", "bias"),
    "cross_entropy": ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                      "label_smoothing"),
    "kl_div": ("input", "target", "size_average", "reduce", "reduction", "log_target"),
    "log_softmax": ("input", "dim", "dtype"),
    "exp": ("input",),
    "log": ("input",),
    "logsumexp": ("input", "dim", "keepdim"),
    "logaddexp": ("input", "other"),
    "stack": ("tensors", "dim"),
    "sum": ("input", "dim", "keepdim", "dtype"),
    "bitwise_and": ("input", "other"),
    "bitwise_right_shift": ("input", "other"),
    "matmul": ("input", "other"),
    "mm": ("input", "mat2"),
    "int_mm": ("input", "mat2"),
}

_FUNCTIONS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", torch.Tensor.add: "add",
    operator.sub: "sub", torch.sub: "sub", torch.Tensor.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", torch.Tensor.mul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div", torch.Tensor.div: "div",
    operator.pow: "pow", torch.pow: "pow", torch.Tensor.pow: "pow",
    torch.square: "square", torch.Tensor.square: "square",
    torch.sqrt: "sqrt", torch.Tensor.sqrt: "sqrt",
    torch.rsqrt: "rsqrt", torch.Tensor.rsqrt: "rsqrt",
    torch.reciprocal: "reciprocal", torch.Tensor.reciprocal: "reciprocal",
    torch.mean: "mean", torch.Tensor.mean: "mean",
    torch.var: "var", torch.Tensor.var: "var",
    torch.rms_norm: "rms_norm", F.rms_norm: "rms_norm",
    torch.layer_norm: "layer_norm", F.layer_norm: "layer_norm",
    torch.Tensor.to: "cast", torch.Tensor.float: "cast", torch.Tensor.type_as: "cast",
    F.silu: "silu", F.gelu: "gelu",
    torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", torch.Tensor.tanh: "tanh", F.tanh: "tanh",
    torch.chunk: "chunk", torch.Tensor.chunk: "chunk",
    torch.split: "split", torch.Tensor.split: "split",
    operator.neg: "neg", torch.neg: "neg", torch.negative: "neg", torch.Tensor.neg: "neg",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.Tensor.contiguous: "contiguous",
    F.linear: "linear",
    F.cross_entropy: "cross_entropy",
    F.kl_div: "kl_div",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax", torch.Tensor.log_softmax: "log_softmax",
    torch.exp: "exp", torch.Tensor.exp: "exp",
    torch.log: "log", torch.Tensor.log: "log",
    torch.logsumexp: "logsumexp", torch.Tensor.logsumexp: "logsumexp",
    torch.logaddexp: "logaddexp", torch.Tensor.logaddexp: "logaddexp",
    torch.stack: "stack",
    torch.sum: "sum", torch.Tensor.sum: "sum",
    operator.and_: "bitwise_and", torch.bitwise_and: "bitwise_and", torch.Tensor.bitwise_and: "bitwise_and",
    operator.rshift: "bitwise_right_shift", torch.bitwise_right_shift: "bitwise_right_shift",
    torch.Tensor.bitwise_right_shift: "bitwise_right_shift",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.Tensor.matmul: "matmul",
    torch.mm: "mm", torch.Tensor.mm: "mm",
    torch._int_mm: "int_mm",
}

_METHODS: dict[str, str] = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "true_divide": "div", "pow": "pow",
    "square": "square", "sqrt": "sqrt", "rsqrt": "rsqrt", "reciprocal": "reciprocal", "mean": "mean", "var": "var",
    "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast", "double": "cast", "type_as": "cast",
    "type": "cast", "sigmoid": "sigmoid", "tanh": "tanh", "chunk": "chunk", "split": "split",
    "neg": "neg", "negative": "neg", "contiguous": "contiguous", "log_softmax": "log_softmax", "exp": "exp",
    "log": "log", "logsumexp": "logsumexp", "logaddexp": "logaddexp", "sum": "sum",
    "bitwise_and": "bitwise_and", "bitwise_right_shift": "bitwise_right_shift", "matmul": "matmul", "mm": "mm",
}


@dataclass(frozen=True)
class Call:
    """A node seen as a canonical op with named operands."""

    op: str
    params: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.params[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)


def canonical(node: Any) -> Call | None:
    """The canonical op of an FX node, or None for anything outside the table (or a non-node)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        op = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        op = _METHODS.get(node.target)
    else:
        return None
    if op is None:
        return None
    params = dict(zip(_PARAMETERS[op], node.args))
    params.update(node.kwargs)
    if op == "split" and "split_size_or_sections" in params:  # torch.split's name for Tensor.split's split_size
        params["split_size"] = params.pop("split_size_or_sections")
    if op == "cat" and "axis" in params:  # torch.concatenate's name for dim
        params["dim"] = params.pop("axis")
    if op == "cast" and not _is_pure_cast(node):
        return None
    if op == "log_softmax" and node.target is F.log_softmax and len(node.args) > 2:
        return None  # F.log_softmax's third positional parameter is _stacklevel, its dtype the fourth
    return Call(op, params)


def _is_pure_cast(node: fx.Node) -> bool:
    """A .to/.float/.type_as that changes at most the dtype: same device, same shape, no copy semantics."""
    source, result = tensor_meta(node.args[0] if node.args else None), tensor_meta(node)
    return (
        source is not None
        and result is not None
        and source.device == result.device
        and source.shape == result.shape
        and result.dtype.is_floating_point
    )


def tensor_meta(arg: Any) -> torch.Tensor | None:
    """The (fake) tensor a node produces, recorded by Dynamo as ``example_value`` (``val`` in aten graphs)."""
    if not isinstance(arg, fx.Node):
        return None
    value = arg.meta.get("example_value", arg.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def dtype_of(arg: Any) -> torch.dtype | None:
    meta = tensor_meta(arg)
    return None if meta is None else meta.dtype


def number(arg: Any) -> float | None:
    """The value of a Python int/float constant operand (bools are not numbers here)."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    return None


def float_operand(arg: Any) -> float | fx.Node | None:
    """A float argument for an op: a Python number, or a float the graph computes, which the op then takes as it is
    (Dynamo makes a float dynamic, a SymFloat read with ``.item()`` from a 0-d input, under ``dynamic=True`` or
    after recompiling for another value; passed to a custom op, Dynamo then specializes the graph on its value)."""
    value = number(arg)
    if value is not None:
        return value
    if isinstance(arg, fx.Node) and isinstance(arg.meta.get("example_value"), torch.SymFloat):
        return arg
    return None


# What `constant` evaluates: arithmetic on numbers and 0-d tensors made from them.
_CONSTANT_FUNCTIONS = {
    torch.tensor, torch.log, torch.exp, torch.log1p, operator.add, operator.sub, operator.mul, operator.truediv,
    operator.neg,
}
_CONSTANT_METHODS = {"log", "exp", "log1p"}


def constant(arg: Any) -> float | None:
    """The value of an operand computed from numbers alone: a Python number, or a 0-d tensor such as
    ``torch.log(1 - torch.tensor(beta))`` (evaluated as eager would, in its dtype), as losses spell weights."""
    value = _constant_value(arg)
    if isinstance(value, torch.Tensor):
        return float(value) if value.dim() == 0 and value.dtype.is_floating_point else None
    return number(value)


def _constant_value(arg: Any) -> Any:
    if not isinstance(arg, fx.Node):
        return arg if number(arg) is not None else None
    known = (arg.op == "call_function" and arg.target in _CONSTANT_FUNCTIONS) or (
        arg.op == "call_method" and arg.target in _CONSTANT_METHODS)
    if not known:
        return None
    args = [_constant_value(a) for a in arg.args]
    if any(a is None for a in args) or any(isinstance(v, fx.Node) for v in arg.kwargs.values()):
        return None
    try:
        if arg.op == "call_method":
            return getattr(torch.as_tensor(args[0]), arg.target)(*args[1:], **arg.kwargs)
        return arg.target(*args, **arg.kwargs)
    except (TypeError, RuntimeError):  # e.g. torch.log of a Python number
        return None


def reduced_dims(dim: Any, ndim: int) -> tuple[int, ...] | None:
    """Normalised (non-negative, sorted) dims of a reduction's `dim` argument; None if not constant."""
    if dim is None:
        return tuple(range(ndim))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    return tuple(sorted(d % ndim for d in dims)) if ndim else None


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def other_operand(call: Call, node: fx.Node) -> Any:
    """For a binary op with `node` as one operand, the other operand (None if `node` is not an operand)."""
    if call["input"] is node:
        return call.get("other")
    if call.get("other") is node:
        return call["input"]
    return None


def scalar_and_tensor(node: Any, op: str) -> tuple[float, fx.Node] | None:
    """(c, t) when `node` is ``c + t`` (``op="add"``, no alpha) or ``c * t`` (``op="mul"``), in either operand
    order, for a Python number c and a graph value t."""
    call = canonical(node)
    if call is None or call.op != op or call.get("alpha", 1) != 1:
        return None
    for constant, tensor in ((call["input"], call.get("other")), (call.get("other"), call["input"])):
        if number(constant) is not None and isinstance(tensor, fx.Node):
            return number(constant), tensor
    return None


_TORCH_DIR = os.path.dirname(torch.__file__)


def _module_path(dynamo_path: str) -> str:
    """``L['self'].model.layers[0]._modules['mlp']`` -> ``model.layers.0.mlp`` (``G[...]``: a global)."""
    path = re.sub(r"^[LG]\['[^']*'\]", "", dynamo_path)
    path = re.sub(r"\._modules\['([^']*)'\]|\['([^']*)'\]|\[(\d+)\]",
                  lambda m: "." + next(g for g in m.groups() if g is not None), path)
    return path.strip(".") or "<root>"


def location(node: fx.Node) -> str:
    """Where a node came from: the innermost module path and the user's source line."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        parts.append(_module_path(list(stack.values())[-1][0]))
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    user_frames = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    if frames:
        file, line = (user_frames or frames)[-1]
        parts.append(f"{file.rsplit('/', 1)[-1]}:{line}")
    return " @ ".join(parts) or node.name


class InexactMatch(Exception):
    """Raised by a matcher: the structure is the pattern's, but the rewrite would not be exact (the message
    says why; it becomes a near-miss in the report)."""


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None

_DISTRIBUTED = ("DTensor (tensor-parallel) values: the liger ops have no sharding rules, so PyTorch's DTensor ops "
                "compute it")


def _distributed(node: fx.Node) -> bool:
    return DTensor is not None and isinstance(node.meta.get("example_value"), DTensor)


def find_matches(graph: fx.Graph, record, match_at: Callable[[fx.Node], Any]) -> list:
    """Try `match_at` on every node, in graph order; keep matches (objects with a ``nodes`` list) that share no
    node with an earlier one, and record each `InexactMatch` raised as a near-miss at that node (and a match over
    DTensors, which the ops cannot take)."""
    matches, claimed = [], set()
    for node in graph.nodes:
        try:
            match = match_at(node)
        except InexactMatch as miss:
            record.near_miss(node, str(miss))
            continue
        if match is not None and any(_distributed(n) for n in match.nodes):
            record.near_miss(node, _DISTRIBUTED)
            continue
        if match is not None and not claimed.intersection(match.nodes):
            claimed.update(match.nodes)
            matches.append(match)
    return matches


class Rewriter:
    """Applies a family's matches to one graph, one after another.

    Matches are found before any is applied, so a later match may name, as an operand, the node an earlier
    one replaced (a norm of a norm's output): `replace` maps such operands to their replacements.
    """

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self._replacements: dict[fx.Node, fx.Node] = {}

    def replace(self, final: fx.Node, target: Any, args: Sequence[Any], matched: Iterable[fx.Node]) -> fx.Node:
        """Compute `final`'s value with one call of `target(*args)`, then drop matched nodes left unused.

        `args` must be defined before `final` (true for any operand of the matched subgraph).
        """
        new = self._call(final, target, args)
        self._substitute(final, new)
        erase_unused(self.graph, matched)
        return new

    def replace_several(self, finals: Sequence[fx.Node], target: Any, args: Sequence[Any],
                        matched: Iterable[fx.Node]) -> fx.Node:
        """Compute the values of `finals` with one call of `target(*args)`, which returns them as a tuple in
        that order. The call goes before the first of `finals`, or right after the last node among `args`
        where that comes later (a weight computed after the first final): the caller makes sure no user of a
        final comes before that node."""
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        first = min(finals, key=order.__getitem__)
        operands = [self._replacements.get(a, a) for a in args if isinstance(a, fx.Node)]
        latest = max(operands, key=order.__getitem__, default=first)
        new = self._call(first if order[latest] < order[first] else latest.next, target, args, meta_from=first)
        new.meta["example_value"] = tuple(final.meta.get("example_value") for final in finals)
        for index, final in enumerate(finals):
            with self.graph.inserting_after(new):
                item = self.graph.call_function(operator.getitem, (new, index))
            _copy_meta(final, item)
            self._substitute(final, item)
        erase_unused(self.graph, matched)
        return new

    def _call(self, before: fx.Node, target: Any, args: Sequence[Any], meta_from: fx.Node | None = None) -> fx.Node:
        """Insert `target(*args)` before `before`, with the meta of `meta_from` (default: `before`)."""
        args = tuple(self._replacements.get(a, a) if isinstance(a, fx.Node) else a for a in args)
        with self.graph.inserting_before(before):
            new = self.graph.call_function(target, args)
        _copy_meta(meta_from or before, new)
        return new

    def _substitute(self, final: fx.Node, new: fx.Node) -> None:
        final.replace_all_uses_with(new)
        self._replacements[final] = new


def _copy_meta(source: fx.Node, target: fx.Node) -> None:
    for key in ("example_value", "val", "stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in source.meta:
            target.meta[key] = source.meta[key]


def recompute_in_backward(new: fx.Node, replaced: fx.Node) -> None:
    """Have AOTAutograd's partitioner recompute `new`'s op in backward instead of saving its output, unless the
    code it replaced carried a policy of its own (selective activation checkpointing). AOTAutograd copies the tag
    onto the nodes traced from `new`. For ops whose inputs backward keeps anyway and whose output is as large as
    they are: the recomputation is one cheap kernel, the saving a whole activation."""
    new.meta["recompute"] = replaced.meta.get("recompute", CheckpointPolicy.PREFER_RECOMPUTE)


# Set on a checkpoint region body's placeholders: the node of the enclosing graph that the region is called with.
_OUTER_OPERAND = "liger_outer_operand"


def link_region_operands(gm: fx.GraphModule) -> None:
    """Tell the placeholders of every activation-checkpoint region body nested in `gm` which node of the
    enclosing graph they receive (`outside`), so that a rewrite inside can look at how an operand was made (the
    causal mask a model builds once and hands to every checkpointed layer)."""
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.target is not torch.ops.higher_order.tag_activation_checkpoint or node.args[0].op != "get_attr":
                continue
            body = getattr(module, node.args[0].target)
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            if len(placeholders) != len(node.args) - 1:
                continue
            for placeholder, operand in zip(placeholders, node.args[1:]):
                placeholder.meta[_OUTER_OPERAND] = operand


def outside(node: Any) -> Any:
    """What `node` is in the graph that encloses its checkpoint region(s), or `node` itself."""
    while isinstance(node, fx.Node) and node.op == "placeholder" and isinstance(node.meta.get(_OUTER_OPERAND),
                                                                                  fx.Node):
        node = node.meta[_OUTER_OPERAND]
    return node


def derived(graph: fx.Graph, function, args: tuple) -> fx.Node:
    """A new node `function(*args)` at the graph's insertion point, its example value computed from its first
    operand's."""
    node = graph.call_function(function, args)
    source = tensor_meta(args[0])
    if source is not None:
        node.meta["example_value"] = function(source, *args[1:])
    return node


def autocast_explicitly(graph: fx.Graph, tensors: Sequence[Any], dtype: torch.dtype) -> list[Any]:
    """`tensors` (nodes or None) cast to `dtype` where they are of another: the casts autocast made without a
    trace in the graph when a linear computed in `dtype` from, e.g., fp32 parameters. Made explicit, the op that
    takes the linear's place computes as it did, whether or not it runs inside the autocast region."""
    return [t if t is None or dtype_of(t) == dtype else derived(graph, torch.Tensor.to, (t, dtype)) for t in tensors]


def erase_unused(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase those of `nodes` that no longer have users, latest first so chains fall away together."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted({n for n in nodes if n in order}, key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)


def last_dim_half(node: Any) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """(t, i, [node, split]) when `node` is half i (0 or 1) of t's last dim taken as ``chunk(t, 2, -1)[i]``,
    ``split(t, d // 2, -1)[i]`` or ``split(t, [d // 2, d // 2], -1)[i]`` (d, t's last dim, even and static)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    split, index = node.args
    call = canonical(split)
    if call is None or call.op not in ("chunk", "split") or index not in (0, 1):
        return None
    source = tensor_meta(call["input"])
    if source is None or source.dim() == 0:
        return None
    if reduced_dims(call.get("dim", 0), source.dim()) != (source.dim() - 1,):
        return None
    width = source.shape[-1]
    if not isinstance(width, int) or width % 2:
        return None
    if call.op == "chunk":
        halves = call.get("chunks") == 2
    else:
        sizes = call.get("split_size")
        halves = sizes == width // 2 or (isinstance(sizes, (list, tuple)) and list(sizes) == [width // 2] * 2)
    return (call["input"], index, [node, split]) if halves else None


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Shapes provably equal, also for symbolic sizes (never adds a guard)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))
