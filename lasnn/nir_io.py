"""NIR export and import: ``to_nir`` / ``from_nir`` between lasnn SNNs and the Neuromorphic Intermediate
Representation (PyPI ``nir``), which snnTorch, Norse, Sinabs, Spyx, Lava and SpikingJelly read and which
reaches Loihi, SpiNNaker2 and Speck.

Time convention: **dt = 1** (one lasnn step is one NIR time unit; the graph's metadata says so). NIR's
neurons are continuous-time ODEs; their forward-Euler step with dt = 1 is exactly lasnn's discrete step:

- ``lasnn.nn.LIF(tau, v_threshold, v_reset=r0, decay_input=True)``: ``H = V + (X - (V - r0)) / tau`` is
  ``nir.LIF(tau=tau, r=1, v_leak=r0, v_threshold, v_reset=r0)`` (``tau dv/dt = (v_leak - v) + r I``);
  with ``decay_input=False`` (``H = V - (V - r0) / tau + X``) it is ``r = tau``.
- ``lasnn.nn.IF`` (tau = inf): ``H = V + X`` is ``nir.IF(r=1, v_threshold, v_reset)``.
- Both reset hard to ``v_reset``. A spike is ``H >= v_threshold`` in lasnn (and SpikingJelly); NIR's
  text says ``v > v_threshold``: the two differ only when the membrane lands exactly on the threshold.

What NIR cannot express is refused with the reason, never exported approximately: soft reset (reset by
subtraction, which converted SNNs use), Poisson encoding (random per step), max pooling, a batch norm
that does not directly follow a conv/linear (others are folded into it), non-integer-ratio adaptive
pooling and any other module or function. Outside the graph, on purpose: the **direct encoding** (the
analog input is fed at every one of the T steps) and the **readout** (lasnn's logits are the mean over
the T steps of the graph's output).
"""

from __future__ import annotations

import copy
import math
import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
from torch import nn

if TYPE_CHECKING:
    from lasnn.nn.spikify import SNN

__all__ = ["NIRBody", "NIRExportError", "from_nir", "register", "to_nir"]

DT = 1.0


class NIRExportError(ValueError):
    """The network uses something NIR cannot express exactly (the message says what and what to change)."""


def _nir():
    try:
        import nir
    except ImportError as e:  # pragma: no cover - the message is the point
        raise ImportError("NIR export needs the `nir` package: pip install nir") from e
    return nir


def _tracer_cls():
    import torch.fx

    from lasnn.nn.pool import AdaptiveAvgPool2d, AvgPool1d, AvgPool2d
    from lasnn.nn.spikify import FoldedNeuron

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            # lasnn's pools are torch pools to the exporter (subclasses, the same arguments)
            lasnn_leaves = (FoldedNeuron, AvgPool1d, AvgPool2d, AdaptiveAvgPool2d)
            return isinstance(m, lasnn_leaves) or super().is_leaf_module(m, qualname)

    return _Tracer


def _trace(body: nn.Module):
    try:
        graph = _tracer_cls()().trace(body)
    except Exception as e:
        raise NIRExportError(
            f"to_nir: torch.fx could not trace the network body ({type(e).__name__}: {e}); the exporter needs a "
            "forward without data-dependent control flow"
        ) from e
    return torch.fx.GraphModule(body, graph)


def _shapes(gm, sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape (no batch dimension) of every fx node, from one step of one sample."""
    from torch.fx.passes.shape_prop import ShapeProp

    from lasnn.nn.spikify import FoldedNeuron

    neurons = [m for m in gm.modules() if isinstance(m, FoldedNeuron)]
    saved = [(m.T, m._streaming) for m in neurons]
    try:
        for m in neurons:
            m.T, m._streaming = 1, False
        with torch.no_grad():
            ShapeProp(gm).propagate(sample)
    finally:
        for m, (T, s) in zip(neurons, saved, strict=True):
            m.T, m._streaming = T, s
    out = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[node.name] = tuple(int(d) for d in meta.shape[1:])
    return out


def _arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64 if t.dtype == torch.float64 else torch.float32).numpy().copy()


def _neuron_node(nir, neuron: nn.Module, shape: tuple[int, ...], where: str):
    from lasnn.nn.neurons import LIF

    if not isinstance(neuron, LIF):
        what = type(neuron).__name__
        extra = (" (a converted SNN's IF neurons reset by subtraction and emit θ·spike; NIR has neither)"
                 if what == "IFNeuron" else "")
        raise NIRExportError(f"to_nir: {where} is a {what}{extra}; only lasnn.nn.LIF / lasnn.nn.IF neurons export")
    if neuron.v_reset is None:
        raise NIRExportError(
            f"to_nir: {where} resets by subtraction (v_reset=None); NIR's LIF/IF reset to v_reset. Train with a "
            "hard reset (v_reset=0.0) to export"
        )
    full = lambda v: np.full(shape, v, dtype=np.float32)  # noqa: E731
    thr, reset = full(neuron.v_threshold), full(neuron.v_reset)
    meta = {"lasnn": {"surrogate": neuron.surrogate, "alpha": neuron.alpha, "detach_reset": neuron.detach_reset}}
    if math.isinf(neuron.tau):
        return nir.IF(r=full(1.0), v_threshold=thr, v_reset=reset, metadata=meta)
    tau = full(neuron.tau)
    r = full(1.0) if neuron.decay_input else tau.copy()
    return nir.LIF(tau=tau, r=r, v_leak=reset.copy(), v_threshold=thr, v_reset=reset, metadata=meta)


def _dense_groups(w: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's weight ``[out, in/groups, *k]`` as the equal dense one ``[out, in, *k]`` (block diagonal).

    nir 1.0.8 types a conv's input as ``weight.shape[1]`` channels, which is wrong for ``groups > 1``, so a
    grouped conv is written dense (the same sums; the extra weights are zeros).
    """
    if groups == 1:
        return w
    out, per = w.shape[0], w.shape[1]
    dense = np.zeros((out, per * groups, *w.shape[2:]), dtype=w.dtype)
    step = out // groups
    for g in range(groups):
        dense[g * step:(g + 1) * step, g * per:(g + 1) * per] = w[g * step:(g + 1) * step]
    return dense


def _pool_node(nir, m: nn.Module, in_shape: tuple[int, ...], where: str):
    if isinstance(m, (nn.AvgPool1d, nn.AdaptiveAvgPool1d)):
        # NIR has no 1-d pooling: a depthwise Conv1d with weights 1/k is the same average
        C, L = in_shape
        if isinstance(m, nn.AvgPool1d):
            if m.ceil_mode or (m.padding not in (0, (0,)) and not m.count_include_pad):
                raise NIRExportError(f"to_nir: {where}: AvgPool1d with ceil_mode or count_include_pad=False "
                                     "padding has no NIR equivalent")
            one = lambda v: int(v[0] if isinstance(v, (tuple, list)) else v)  # noqa: E731
            k, st, pad = one(m.kernel_size), one(m.stride if m.stride is not None else m.kernel_size), one(m.padding)
        else:
            o = m.output_size[0] if isinstance(m.output_size, (tuple, list)) else m.output_size
            k = st = L // (o or L)
            pad = 0
        w = _dense_groups(np.full((C, 1, k), 1.0 / k, dtype=np.float32), C)
        return nir.Conv1d(input_shape=int(L), weight=w, stride=np.array([st]), padding=np.array([pad]),
                          dilation=np.array([1]), groups=1, bias=np.zeros(C, dtype=np.float32))
    if isinstance(m, nn.AvgPool2d):
        if m.ceil_mode or (m.padding not in (0, (0, 0)) and not m.count_include_pad) or m.divisor_override:
            raise NIRExportError(f"to_nir: {where}: AvgPool2d with ceil_mode, count_include_pad=False padding or "
                                 "divisor_override has no NIR equivalent")
        pair = lambda v: np.array(v if isinstance(v, (tuple, list)) else (v, v))  # noqa: E731
        stride = m.stride if m.stride is not None else m.kernel_size
        return nir.AvgPool2d(kernel_size=pair(m.kernel_size), stride=pair(stride), padding=pair(m.padding))
    # AdaptiveAvgPool2d, plain (checked by the caller): an average pool with kernel = stride = input / output
    h, w = in_shape[-2:]
    o = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size, m.output_size)
    oh, ow = (h if o[0] is None else o[0]), (w if o[1] is None else o[1])
    k = np.array((h // oh, w // ow))
    return nir.AvgPool2d(kernel_size=k, stride=k.copy(), padding=np.array((0, 0)))


def _node_name(node, from_nir_body: bool) -> str:
    if node.op != "call_module":
        return node.name
    target = node.target.removeprefix("layers.") if from_nir_body else node.target
    return target.replace(".", "_")


def _plain_adaptive(m: nn.Module, in_shape: tuple[int, ...]) -> bool:
    """Whether an adaptive average pool is a plain one (every output size divides its input size)."""
    sizes = in_shape[1:]
    o = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,) * len(sizes)
    return all(n % (k or n) == 0 for n, k in zip(sizes, o, strict=True))


def _is_flatten(node, modules) -> bool:
    if node.op == "call_module":
        f = modules[node.target]
        return isinstance(f, nn.Flatten) and f.start_dim == 1 and f.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        return tuple(node.args[1:]) in ((1,), (1, -1)) and not node.kwargs
    return node.op == "call_method" and node.target == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1))


def _merge_pool_flatten_linear(node, pool: nn.Module, in_shape, modules, dtype):
    """For adaptive pool -> flatten -> linear (each the only user of the one before): the linear's node
    and the weight and bias of the single Affine equal to the three (computed in float64), else None."""
    users = list(node.users)
    if len(users) != 1 or not _is_flatten(users[0], modules):
        return None
    after = list(users[0].users)
    if len(after) != 1 or after[0].op != "call_module" or not isinstance(modules[after[0].target], nn.Linear):
        return None
    lin = modules[after[0].target]
    n_in = int(np.prod(in_shape))
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *in_shape)
    p = pool(eye).reshape(n_in, -1).T  # [pooled features, map features]: the pool as a matrix
    w = lin.weight.detach().to(torch.float64).cpu() @ p
    b = lin.bias.detach().to(torch.float64).cpu() if lin.bias is not None else torch.zeros(w.shape[0],
                                                                                           dtype=torch.float64)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return after[0], w.to(out_dtype).numpy(), b.to(out_dtype).numpy()


@torch.no_grad()
def to_nir(snn: nn.Module, input_shape: tuple[int, ...] | None = None) -> Any:
    """Export a spiking network to a ``nir.NIRGraph`` (dt = 1; see the module docstring for the mapping).

    Batch norms are folded into the conv/linear before them (eval-mode statistics); conv/linear become
    ``Conv1d``/``Conv2d``/``Affine``/``Linear``, average pools ``AvgPool2d``, flatten ``Flatten``, LIF/IF
    neurons ``LIF``/``IF`` with per-neuron parameter arrays, and a residual addition becomes two edges into
    the next node (NIR sums a node's inputs). Identity and dropout (inference) vanish.

    Args:
        snn: a ``lasnn.spikify`` SNN (a directly trained or distilled student, or ``from_nir``'s result) with
            direct encoding and hard-reset LIF/IF neurons.
        input_shape: one sample's shape without batch, e.g. ``(1, 28, 28)``; None: the model zoo's input shape
            recorded on the SNN (``snn.body.input_shape``) when there is one.
    Returns:
        a ``nir.NIRGraph`` with nodes ``input``, one per layer (named after the module path), ``output``;
        ``metadata`` holds ``dt``, the encoding and readout conventions and the source.
    Raises:
        NIRExportError naming the layer and the reason for anything NIR cannot express exactly;
        TypeError for something that is not a lasnn SNN.
    """
    nir = _nir()
    from lasnn.convert.fold import _fold_into
    from lasnn.nn.encoders import DirectEncoder
    from lasnn.nn.spikify import SNN, FoldedNeuron

    if not isinstance(snn, SNN):
        raise TypeError(f"snn must be a lasnn SNN (lasnn.spikify, a student run's model), got {type(snn).__name__}")
    if not isinstance(snn.encoder, DirectEncoder):
        raise NIRExportError(
            f"to_nir: the SNN's encoder is {type(snn.encoder).__name__}; only direct encoding (the analog input at "
            "every step, fed from outside the graph) exports. Poisson spikes are random per step and NIR has no "
            "such node: encode outside and export a direct-encoding SNN"
        )
    if input_shape is None:
        input_shape = getattr(snn.body, "input_shape", None)
        if input_shape is None:
            raise ValueError("input_shape: give one sample's shape without batch, e.g. (1, 28, 28)")
    if not (isinstance(input_shape, (tuple, list)) and input_shape
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints (no batch), got {input_shape!r}")
    input_shape = tuple(input_shape)
    if len(input_shape) != snn.input_dims - 1:
        raise ValueError(f"input_shape {input_shape} has {len(input_shape)} dims but the SNN takes "
                         f"[B, ...] inputs of {snn.input_dims} dims (so {snn.input_dims - 1} without batch)")

    body = copy.deepcopy(snn.body).eval()
    p0 = next(iter(body.parameters()), None)
    dtype = p0.dtype if p0 is not None else torch.float32
    gm = _trace(body)
    modules = dict(gm.named_modules())
    shapes = _shapes(gm, torch.zeros((1, *input_shape), dtype=dtype, device=p0.device if p0 is not None else "cpu"))

    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array(input_shape)})}
    edges: list[tuple[str, str]] = []
    # fx node -> the NIR nodes whose outputs sum to its value (a residual add has two)
    src: dict[str, list[str]] = {}
    folded: set[str] = set()
    bns = (nn.BatchNorm1d, nn.BatchNorm2d)

    def connect(fx_arg, to: str, where: str) -> None:
        if not isinstance(fx_arg, torch.fx.Node):
            raise NIRExportError(f"to_nir: {where} takes a constant input; NIR nodes read other nodes only")
        sources = src[fx_arg.name]
        if len(set(sources)) != len(sources):
            raise NIRExportError(f"to_nir: {where} reads a sum that has the same node twice (x + x); scale instead")
        edges.extend((s, to) for s in sources)

    skip: set[str] = set()  # nodes already exported as part of a merged pattern
    for node in gm.graph.nodes:
        if node.name in skip:
            continue
        where = f"{node.target}" if node.op == "call_module" else f"{node.op} {node.target}"
        if node.op == "placeholder":
            src[node.name] = ["input"]
            continue
        if node.op == "output":
            nodes["output"] = nir.Output(output_type={"output": np.array(shapes[node.args[0].name])})
            connect(node.args[0], "output", "the output")
            continue
        if node.op in ("call_method", "call_function") and node.name not in shapes:
            continue  # not a tensor (x.size(0), x.shape[0]): only an argument of a view/reshape below
        if node.op == "call_function" and node.target in (operator.add, torch.add):
            a, b = node.args[:2]
            if len(node.args) > 2 or node.kwargs or not all(isinstance(v, torch.fx.Node) for v in (a, b)):
                raise NIRExportError(f"to_nir: {where}: only the sum of two layer outputs exports (a residual edge)")
            src[node.name] = src[a.name] + src[b.name]
            continue
        if node.op == "call_function" and node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            m: nn.Module = nn.Flatten(start, end)
        elif node.op == "call_module":
            m = modules[node.target]
        elif node.op == "call_method" and node.target in ("flatten", "view", "reshape") and \
                len(shapes.get(node.name, ())) == 1:
            m = nn.Flatten(1, -1)  # x.flatten(1) / x.view(x.size(0), -1): flatten everything but the batch
        else:
            raise NIRExportError(f"to_nir: {where} has no NIR equivalent (supported: conv, linear, batch norm after "
                                 "them, average pooling, flatten, residual additions, LIF/IF neurons)")
        name = _node_name(node, isinstance(body, NIRBody))
        if name in nodes:
            raise NIRExportError(f"to_nir: {where} is called more than once in a forward; NIR nodes have one place "
                                 "in the graph, so give each call site its own module")
        arg = node.args[0]
        in_shape = shapes[arg.name] if isinstance(arg, torch.fx.Node) else ()
        if isinstance(m, (nn.Identity, nn.Dropout)):
            src[node.name] = src[arg.name]
            continue
        if isinstance(m, bns):
            if node.target in folded:
                src[node.name] = src[arg.name]
                continue
            raise NIRExportError(f"to_nir: {where}: a batch norm that does not directly follow a conv/linear "
                                 "(used only there) cannot be folded; NIR has no batch-norm node")
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], bns):
                m = copy.deepcopy(m)
                _fold_into(m, modules[users[0].target])
                folded.add(users[0].target)
            w = _arr(m.weight)
            b = _arr(m.bias) if m.bias is not None else None
            if isinstance(m, nn.Linear):
                nodes[name] = nir.Affine(weight=w, bias=b) if b is not None else nir.Linear(weight=w)
            else:
                if isinstance(m.padding, str):
                    raise NIRExportError(f"to_nir: {where}: string padding ({m.padding!r}); use integer padding")
                if m.padding_mode != "zeros":
                    raise NIRExportError(f"to_nir: {where}: padding_mode={m.padding_mode!r}; NIR pads with zeros")
                cls = nir.Conv2d if isinstance(m, nn.Conv2d) else nir.Conv1d
                if b is None:
                    b = np.zeros(w.shape[0], dtype=w.dtype)
                spatial = np.array(in_shape[1:]) if cls is nir.Conv2d else int(in_shape[1])  # nir.Conv1d: an int
                nodes[name] = cls(input_shape=spatial, weight=_dense_groups(w, m.groups), stride=np.array(m.stride),
                                  padding=np.array(m.padding), dilation=np.array(m.dilation), groups=1, bias=b)
        elif isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            uneven = isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) and not _plain_adaptive(m, in_shape)
            merged = _merge_pool_flatten_linear(node, m, in_shape, modules, dtype) if uneven else None
            if merged is None and uneven:
                raise NIRExportError(f"to_nir: {where}: {type(m).__name__}({m.output_size}) on a {in_shape[1:]} map "
                                     "is not a plain average pool (the output size must divide the input size) "
                                     "and is not followed by flatten -> linear, into which it could be merged")
            if merged is None:
                nodes[name] = _pool_node(nir, m, in_shape, where)
            else:
                # Flatten the map and apply one Affine = Linear o flatten o pool (all linear, no neuron between)
                lin_node, weight, bias = merged
                flat, aff = (name if name.endswith("_flatten") else f"{name}_flatten"), _node_name(lin_node, False)
                aff = aff.removeprefix("layers_") if isinstance(body, NIRBody) else aff
                nodes[flat] = nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=0, end_dim=-1)
                nodes[aff] = nir.Affine(weight=weight, bias=bias)
                connect(arg, flat, where)
                edges.append((flat, aff))
                for n in (node, *node.users, lin_node):
                    src[n.name] = [aff]
                skip.update(n.name for n in (*node.users, lin_node))
                continue
        elif isinstance(m, nn.Flatten):
            # NIR's shapes have no batch dimension: torch's dim d of [B, *in_shape] is NIR's d - 1
            nd = len(in_shape) + 1
            start, end = m.start_dim % nd, m.end_dim % nd
            if start == 0:
                raise NIRExportError(f"to_nir: {where}: a Flatten from dim 0 would merge the batch into the features")
            nodes[name] = nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=start - 1, end_dim=end - 1)
        elif isinstance(m, FoldedNeuron):
            nodes[name] = _neuron_node(nir, m.neuron, shapes[node.name], where)
        else:
            raise NIRExportError(f"to_nir: {where} is a {type(m).__name__}, which has no exact NIR equivalent "
                                 "(supported: conv, linear, batch norm after them, average pooling, flatten, "
                                 "residual additions, LIF/IF neurons)")
        connect(arg, name, where)
        src[node.name] = [name]
    metadata = {
        "dt": DT, "source": "lasnn", "time_step": "one lasnn step = one NIR time unit (forward Euler, dt = 1)",
        "encoding": "direct: the analog input is fed to the input node at every step (outside the graph)",
        "readout": "the logits are the mean over the T steps of the output node (outside the graph)",
        "T": int(snn.T),
    }
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)


class NIRBody(nn.Module):
    """The layers of a NIR graph run in topological order on time-folded tensors ``[T*B, ...]``.

    A node's input is the sum of the outputs of the nodes with an edge into it (NIR's rule); the result is
    the sum of the inputs of the ``output`` node. Built by ``from_nir``.
    """

    def __init__(self, layers: dict[str, nn.Module], order: list[str], preds: dict[str, list[str]]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.order = list(order)
        self.preds = {k: list(v) for k, v in preds.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T*B, *input_shape]`` -> the output node's input ``[T*B, *output_shape]``."""
        vals: dict[str, torch.Tensor] = {"input": x}

        def gather(name: str) -> torch.Tensor:
            ps = self.preds[name]
            out = vals[ps[0]]
            for p in ps[1:]:
                out = out + vals[p]
            return out

        for name in self.order:
            vals[name] = self.layers[name](gather(name))
        return gather("output")


def _uniform(arr: Any, what: str, name: str) -> float:
    a = np.asarray(arr, dtype=np.float64)
    if a.size == 0 or not np.all(a == a.flat[0]):
        raise NIRExportError(f"from_nir: node {name!r}: {what} differs between neurons; lasnn neurons share one value")
    return float(a.flat[0])


def _from_node(nir, node: Any, name: str, dt: float, T: int) -> nn.Module:
    from lasnn.nn.neurons import IF, LIF
    from lasnn.nn.spikify import FoldedNeuron

    f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    meta = (getattr(node, "metadata", None) or {}).get("lasnn", {}) if isinstance(node, (nir.LIF, nir.IF)) else {}
    neuron_kw = {k: meta[k] for k in ("surrogate", "alpha", "detach_reset") if k in meta}
    if isinstance(node, (nir.Affine, nir.Linear)):
        w = np.asarray(node.weight)
        bias = isinstance(node, nir.Affine) and node.bias is not None
        m = nn.Linear(w.shape[1], w.shape[0], bias=bias)
        m.weight.data = f(w)
        if bias:
            m.bias.data = f(node.bias)
        return m
    if isinstance(node, (nir.Conv1d, nir.Conv2d)):
        w = np.asarray(node.weight)
        if isinstance(node.padding, str):
            raise NIRExportError(f"from_nir: node {name!r}: string padding {node.padding!r} is not supported")
        cls = nn.Conv2d if isinstance(node, nir.Conv2d) else nn.Conv1d
        tup = lambda v: tuple(int(i) for i in np.atleast_1d(v))  # noqa: E731
        m = cls(w.shape[1] * int(node.groups), w.shape[0], kernel_size=tuple(w.shape[2:]), stride=tup(node.stride),
                padding=tup(node.padding), dilation=tup(node.dilation), groups=int(node.groups), bias=True)
        m.weight.data = f(w)
        m.bias.data = f(node.bias) if node.bias is not None else torch.zeros(w.shape[0])
        return m
    if isinstance(node, nir.AvgPool2d):
        tup = lambda v: tuple(int(i) for i in np.atleast_1d(v))  # noqa: E731
        return nn.AvgPool2d(tup(node.kernel_size), tup(node.stride), tup(node.padding))
    if isinstance(node, nir.Flatten):
        end = int(node.end_dim)
        return nn.Flatten(int(node.start_dim) + 1 if node.start_dim >= 0 else int(node.start_dim),
                          end + 1 if end >= 0 else end)
    if isinstance(node, nir.LIF):
        tau = _uniform(node.tau, "tau", name) / dt  # in steps
        r = _uniform(node.r, "r", name)
        leak, reset = _uniform(node.v_leak, "v_leak", name), _uniform(node.v_reset, "v_reset", name)
        thr = _uniform(node.v_threshold, "v_threshold", name)
        if leak != reset:
            raise NIRExportError(f"from_nir: node {name!r}: v_leak ({leak}) != v_reset ({reset}); lasnn's LIF leaks "
                                 "towards its reset value")
        # Euler step: v += dt/tau_s (v_leak - v + r I); lasnn: decay_input -> I / tau (r = 1), else I (r = tau)
        if math.isclose(r, 1.0, rel_tol=0, abs_tol=1e-12):
            decay_input = True
        elif math.isclose(r * dt, tau * dt, rel_tol=1e-9):
            decay_input = False
        else:
            raise NIRExportError(f"from_nir: node {name!r}: r = {r} is neither 1 (input decays with tau) nor tau "
                                 f"(= {tau * dt}); lasnn's LIF cannot scale its input otherwise")
        return FoldedNeuron(LIF(tau=tau, v_threshold=thr, v_reset=reset, decay_input=decay_input, **neuron_kw), T)
    if isinstance(node, nir.IF):
        r = _uniform(node.r, "r", name)
        if not math.isclose(r * dt, 1.0, rel_tol=1e-9):
            raise NIRExportError(f"from_nir: node {name!r}: r * dt = {r * dt}; lasnn's IF adds its input unscaled")
        return FoldedNeuron(IF(v_threshold=_uniform(node.v_threshold, "v_threshold", name),
                               v_reset=_uniform(node.v_reset, "v_reset", name), **neuron_kw), T)
    raise NIRExportError(f"from_nir: node {name!r} is a {type(node).__name__}; lasnn reads Input, Output, Affine, "
                         "Linear, Conv1d, Conv2d, AvgPool2d, Flatten, LIF and IF")


def from_nir(graph: Any, *, T: int | None = None) -> SNN:
    """Build a lasnn SNN from a ``nir.NIRGraph`` that uses the node types ``to_nir`` writes.

    Args:
        graph: a ``nir.NIRGraph`` (e.g. ``nir.read("model.nir")``), written by lasnn, SpikingJelly or snnTorch
            with the same node types; ``metadata["dt"]`` (default 1) converts the neurons' time constants to
            steps. Recurrent edges (cycles) are refused.
        T: the SNN's time steps; None: ``metadata["T"]``.
    Returns:
        a ``lasnn.nn.SNN`` with direct encoding: ``snn(x [B, *input_shape]) -> [B, *output_shape]``, the mean
        over T steps (``return_steps=True``: every step), usable by ``lasnn.convert``-side evaluation,
        ``accuracy_vs_timesteps``, fine-tuning and ``to_nir`` (which gives the same graph back).
    Raises:
        NIRExportError for a node or parameter lasnn cannot run exactly; ValueError for a malformed graph.
    """
    nir = _nir()
    from lasnn.nn.encoders import DirectEncoder
    from lasnn.nn.spikify import SNN

    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(f"graph must be a nir.NIRGraph, got {type(graph).__name__}")
    meta = dict(graph.metadata or {})
    dt = float(meta.get("dt", DT))
    if T is None:
        T = meta.get("T")
        if T is None:
            raise ValueError("T: the graph's metadata has no T; pass from_nir(graph, T=...)")
    T = int(T)
    inputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Input)]
    outputs = [k for k, n in graph.nodes.items() if isinstance(n, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"graph must have one Input and one Output node, got {inputs} and {outputs}")
    rename = {inputs[0]: "input", outputs[0]: "output"}
    key = lambda k: rename.get(k, k.replace(".", "_"))  # noqa: E731
    preds: dict[str, list[str]] = {key(k): [] for k in graph.nodes}
    for a, b in graph.edges:
        if a not in graph.nodes or b not in graph.nodes:
            raise ValueError(f"graph edge ({a!r}, {b!r}) names a node that does not exist")
        preds[key(b)].append(key(a))
    # topological order (Kahn); what is left over lies on a cycle
    order, done = [], {"input"}
    pending = [k for k in preds if k not in ("input", "output")]
    while pending:
        ready = [k for k in pending if all(p in done for p in preds[k])]
        if not ready:
            raise NIRExportError(f"from_nir: the graph has recurrent edges (a cycle through {sorted(pending)}); "
                                 "lasnn runs feed-forward graphs")
        for k in ready:
            if not preds[k]:
                raise ValueError(f"graph node {k!r} has no input edge")
            order.append(k)
            done.add(k)
        pending = [k for k in pending if k not in done]
    if not preds["output"]:
        raise ValueError("graph's Output node has no input edge")
    by_key = {key(k): n for k, n in graph.nodes.items()}
    layers = {k: _from_node(nir, by_key[k], k, dt, T) for k in order}
    in_shape = np.asarray(graph.nodes[inputs[0]].input_type["input"]).tolist()
    body = NIRBody(layers, order, preds)
    body.input_shape = tuple(int(d) for d in in_shape)
    return SNN(body, T, DirectEncoder(T), input_dims=len(in_shape) + 1).eval()


def _cmd_export(args: Any) -> int:
    import sys

    from lasnn.distill import load_run
    from lasnn.distill.checkpoint import load_checkpoint

    try:
        run = load_run(args.run, which=args.which)
        if run.kind == "teacher":
            raise NIRExportError(f"--run {args.run!r} is a teacher (an ANN); export a train-snn or distill run")
        info = load_checkpoint(run.checkpoint).get("dataset_info", {})
        graph = to_nir(run.model, tuple(info["input_shape"]) if info.get("input_shape") else None)
        graph.metadata.update({"run": str(args.run), "checkpoint": run.checkpoint.name, "dataset": run.dataset,
                               "model": run.config.student})
        _nir().write(args.out, graph)
    except (ValueError, TypeError, ImportError) as e:
        print(f"lasnn export-nir: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {args.out}: {len(graph.nodes)} nodes, {len(graph.edges)} edges, dt = {DT:g} "
              f"(direct encoding and the mean-over-T readout stay outside the graph)")
    return 0


def register(subparsers: Any) -> None:
    """Add ``export-nir`` to the ``lasnn`` command line."""
    p = subparsers.add_parser(
        "export-nir", help="write a student run's SNN as a NIR graph (for other simulators and hardware)",
        description="Export a train-snn or distill run's SNN to a .nir file (batch norm folded, dt = 1; see "
        "lasnn.to_nir). Soft reset and Poisson encoding are refused with the reason.",
    )
    p.add_argument("--run", required=True, help="train-snn or distill run folder (or its checkpoint)")
    p.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint (default best)")
    p.add_argument("--out", required=True, help="the .nir file to write")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_cmd_export)
