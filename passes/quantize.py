"""quantize: static int8 QDQ that onnxruntime's CPU provider runs with integer kernels.

BatchNormalization is folded into the layer before it first (`onnxcompress.fold`). Placement
follows what onnxruntime fuses: every quantized layer (Conv, Gemm, MatMul with constant
weights) reads its input through QuantizeLinear -> DequantizeLinear, and its output (after a Relu
or Clip it feeds alone, which the requantization absorbs) goes through one too, so that the
DQ -> layer -> Q group becomes QLinearConv / QLinearMatMul / QGemm. Activations are asymmetric
uint8 per tensor, ranged on calibration data (`onnxcompress.calibration`: minmax, percentile, mse,
entropy, or per tensor the range with least round-trip error); weights are symmetric int8 (zero
point 0, the kernels' fast path), per output channel; biases int32 at input scale x weight scale,
the scale the integer kernels assume.

Accuracy tools, layers front to back on the model as quantized so far: each layer's float weights
are first refit by least squares from its inputs there onto the float model's output of the same
tensor (`refit`: the distillation engine's layer-wise fit, held-out check included), so that they
compensate what quantization upstream did to those inputs; then rounded by data (`rounding="gptq"`:
each rounding error compensated on the columns not yet rounded through the inverse Gram matrix of
the layer's quantized inputs), and the shift this leaves in each output channel's mean is folded
into the bias (`bias_correction`). PP-OCRv4 rec on 512 rendered lines: 88.5% of lines as fp32 with
the refit, 81.2% without. With a budget (`max_drop`, or
the run's), mixed precision keeps the weights and activations whose quantization costs the most in
float until the agreement with the float model on the calibration data holds
(`onnxcompress.precision`). Speed: when the run measures latency, kinds of layers whose int8
kernels are slower than the float ones (depthwise convs on some models, a stem with few input
channels) go back to float where timing the model both ways says it is faster
(`precision.faster_in_float`). Per-channel weight scales need DequantizeLinear's `axis` (opset 13): a
model below it is converted by onnx's version converter first, and the report says so.

Also handled: LSTMs (onnxruntime's DynamicQuantizeLSTM, whatever `activations` says), layers inside
If/Loop/Scan bodies (MatMul/Gemm dynamically, Conv weights int8: calibration cannot reach a body's
activations), and `activations="dynamic"` for MatMul-heavy models (`onnxcompress.dynamic`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import calibration as Cal, graph as G, qdq as Q, weights as W
from onnxcompress.layers import channel_spread, from_out_rows, group_slices, out_axis, out_rows
from onnxcompress.data import Dataset
from onnxcompress.dynamic import dynamic_lstm, dynamic_matmul
from onnxcompress.equalize import equalize
from onnxcompress.fold import fold_batchnorms
from onnxcompress.pass_api import Context, Pass, PassResult
from onnxcompress.precision import Scorer, faster_in_float, search
from onnxcompress.recovery import mean_shift, sequential
from onnxcompress.runtime import capture
from onnxcompress.solvers import gptq
from onnxcompress.storage import Quantized, as_quantized

__all__ = ["Quantize"]

INT8 = onnx.TensorProto.INT8
ACT = "activation:"       # mixed-precision candidates that are activations, not layers
PLAIN_SEARCH_SHARE = 0.1  # mixed precision: above this share of candidates kept, also search without the refit
DEPTHWISE_SPREAD = 3.0    # max / median channel range above which a depthwise conv keeps per-channel scales


@dataclass
class Quantize(Pass):
    """Static int8 QDQ: uint8 activations calibrated on data, int8 symmetric per-channel weights."""

    name = "quantize"
    handles = frozenset({"Conv", "Gemm", "MatMul", "LSTM"})
    activations: Literal["static", "dynamic"] = "static"
    calibration: Literal["auto", "minmax", "percentile", "mse", "entropy"] = "auto"
    percentile: float = 99.99
    per_channel: bool = True
    depthwise_per_channel: bool = False   # depthwise convs: one scale per tensor unless this is set
    refit: bool = True               # first fit each layer's float weights to the float model's output from
                                     # its inputs in the model as quantized so far (onnxcompress.recovery)
    rounding: Literal["nearest", "gptq"] = "gptq"
    bias_correction: bool = True
    fold_bn: bool = True             # fold BatchNormalization into the layer before it first (onnxcompress.fold)
    equalize: bool = True            # cross-layer equalization of pairs joined by ReLU-like ops (onnxcompress.equalize)
    calib_samples: int = 512          # samples whose activations set the ranges
    exclude: tuple[str, ...] = ()
    mixed_precision: bool = True      # keep the costliest layers in float until the budget holds
    latency_aware: bool = True        # keep kinds of layers whose int8 kernels are slower in float, by timing
                                      # the model both ways (when the run measures latency)
    max_drop: float | None = None     # that budget, in points of agreement with the float model on the
                                      # calibration data; None: the run's --max-drop (none: no search)
    eval_samples: int = 256           # calibration samples the mixed-precision search scores on
    sensitivity: Literal["measured", "estimated"] = "measured"    # of each weight and activation: one model each, or its own error
    measure_top: int = 0              # "measured": only the costliest this many by the estimate (0: all)

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    def required_opset(self) -> int:
        return 13 if self.per_channel and self.activations == "static" else 10

    def run(self, graph: gs.Graph, ctx: Context) -> PassResult:
        done = Q.integer_layers(graph)
        if done:
            return PassResult(graph, False, {"layers_quantized": 0},
                              [f"the model is already quantized ({done} layers with integer weights or kernels); "
                               "left as it is"])
        lstms = [n for n in graph.nodes if n.op == "LSTM" and n.name not in self.exclude and dynamic_lstm(graph, n)]
        body_notes = self._bodies(graph)
        if self.activations == "dynamic":
            return self._dynamic(graph, len(lstms), body_notes)
        data = ctx.require_calib(self.name)
        layers, notes = W.quantizable_layers(graph, self.handles - {"LSTM"}, self.exclude)
        notes += body_notes
        if lstms:
            notes.append(f"{len(lstms)} LSTM layers quantized dynamically (DynamicQuantizeLSTM)")
        notes += [f"{n.op} '{G.display_name(n)}': onnxruntime has no integer kernel for it; left in float"
                  for n in graph.nodes if n.op in ("GRU", "RNN")]
        if not layers:
            return PassResult(graph, bool(lstms or body_notes), {"layers_quantized": len(lstms)}, notes)
        if self.fold_bn and (folded := fold_batchnorms(graph)[0]):
            G.tidy(graph)
            notes.append(f"{folded} BatchNormalization folded into the layers before them (an integer kernel cannot "
                         "apply one after its output is requantized)")
        if self.equalize and (pairs := equalize(graph, self.exclude)):
            notes.append(f"cross-layer equalization: {len(pairs)} layer pairs rescaled (the float model's function unchanged)")
        float_graph = graph.copy()
        acts, ties, chains = self._activations(graph, layers)
        budget = self.max_drop if self.max_drop is not None else ctx.max_drop
        searching = budget is not None and self.mixed_precision
        params, values = self._ranges(graph, acts, ties, searching, ctx, data)
        x_name = {id(n): n.inputs[0].name for n in layers}
        ids = {G.layer_id(n) for n in layers}
        done_layers, graph, refit = self._fit(float_graph, ids, params, chains, set(), ctx, data, self.refit)
        layers = [n for n in graph.nodes if G.layer_id(n) in ids]
        padded = {G.display_name(n): G.layer_id(n) for n in layers if G.display_name(n) in Q.pad_input_channels(graph, layers)}
        stats = {"layers_quantized": len(layers), "activations_quantized": len(acts), "layers_refit": refit,
                 "weight_rel_error": float(np.mean([d.error for d in done_layers.values()]))}
        make = lambda kept: self._make(float_graph, done_layers, params, chains, kept)
        kept: set[str] = set()
        timing = self.latency_aware and ctx.timing is not None
        scorer = Scorer(G.to_model(float_graph.copy(), like=ctx.original), data.take(self.eval_samples), ctx.providers,
                        ctx.batch_size) if searching or timing else None      # the float model's outputs, run once
        if searching:
            estimate = None
            if self.sensitivity == "estimated" or self.measure_top:
                reader = {x_name[id(n)]: n for n in layers}
                estimate = {G.layer_id(n): done_layers[G.layer_id(n)].error for n in layers}
                estimate.update({ACT + name: Q.input_noise(reader.get(name), values[name], *params[name])
                                 for name in acts if name not in chains})
            kept, done_layers = _mixed_precision(self, float_graph, ids, done_layers, params, chains, budget, ctx, data,
                                                 scorer, stats, notes, estimate)
        if timing:
            by_speed, lines = faster_in_float(_kinds(float_graph, done_layers), lambda k: G.to_model(G.tidy(make(k)), like=ctx.original),
                                              kept, ctx.timing, data, ctx.providers, score=lambda m: scorer(m)[0])
            if lines:
                notes.append("int8 or float by measured latency (one thread, batch "
                             f"{', '.join(map(str, ctx.timing.batch_sizes))}): " + "; ".join(lines))
            stats["layers_float_for_speed"] = len(by_speed - kept)
            kept = by_speed
        if padded := [name for name, lid in padded.items() if lid not in kept]:
            notes.append(f"input channels padded to a multiple of {Q.CHANNEL_MULTIPLE} with zero weights (onnxruntime's "
                         f"fast int8 conv kernel): {', '.join(padded)}")
        graph = make(kept)
        stats["layers_quantized"] -= sum(not k.startswith(ACT) for k in kept)
        stats["activations_quantized"] = sum(n.op == "QuantizeLinear" for n in graph.nodes)
        return PassResult(graph, stats["layers_quantized"] > 0 or bool(lstms or body_notes), stats, notes)

    def _ranges(self, graph: gs.Graph, acts: dict[str, gs.Tensor], ties: dict[str, str], searching: bool,
                ctx: Context, data: Dataset) -> tuple[dict[str, tuple[float, int]], dict[str, np.ndarray] | None]:
        """Each activation's uint8 (scale, zero point) from calibration data, and its whole values where
        the mixed-precision search estimates costs from them (else None). The model exported for
        the ranges and the value samples go on return: the 25M CNN's are 100 and 56 MB that the
        rest of the pass does not need."""
        ranged = G.to_model(graph, like=ctx.original)
        values = None
        if searching and (self.sensitivity == "estimated" or self.measure_top):   # estimates read whole tensors
            values = capture(ranged, data, list(acts), ctx.providers, ctx.batch_size, max_samples=self.calib_samples)
            summaries = {name: Cal.summarize([values[name]]) for name in acts}
        else:
            summaries = Cal.summarize_activations(ranged, data.take(self.calib_samples), list(acts), ctx.providers,
                                                  ctx.batch_size)
        params = {name: Cal.uint8_params(*Cal.activation_range(summaries[name], self.calibration, self.percentile))
                  for name in acts}
        for name in _tie_order(ties):
            params[name] = params[ties[name]]
        return params, values

    def _fit(self, float_graph: gs.Graph, ids: set[str], params: dict[str, tuple[float, int]], chains: dict[str, str],
             kept: set[str], ctx: Context, data: Dataset, refit: bool) -> tuple[dict[str, "_Layer"], gs.Graph, int]:
        """Quantize the layers `ids` except those in `kept` (whose activations, ACT + name, stay float
        too) front to back on the model as quantized so far: refit onto the float model's outputs
        (if `refit`), GPTQ rounding, bias correction. Returns each layer's storages, the quantized
        graph (input channels not padded yet) and how many layers the refit changed. A layer's
        weights compensate what is quantized before it, so a different `kept` needs its own fit."""
        graph = float_graph.copy()
        layers = [n for n in graph.nodes if G.layer_id(n) in ids - kept]
        x_scale = {id(n): params[n.inputs[0].name][0] for n in layers}
        float_acts = self._float_acts(chains, kept)
        for name, tensor in self._activations(graph, layers)[0].items():
            if name not in float_acts and name in params:
                Q.insert_qdq(graph, tensor, *params[name], layers)
        done: dict[str, _Layer] = {}

        def visit(node: gs.Node, grams: list[np.ndarray] | None) -> None:
            done[G.layer_id(node)] = layer = self._quantize_weights(node, x_scale[id(node)], grams)
            _write(graph, node, layer)

        changed = 0
        if self.rounding == "gptq" or self.bias_correction or refit:
            changed = sequential(graph, ctx, data.take(self.calib_samples), {id(n): visit for n in layers},
                                 reference=float_graph if refit else None)
        else:
            for node in layers:
                visit(node, None)
        return done, graph, changed

    @staticmethod
    def _float_acts(chains: dict[str, str], kept: set[str]) -> frozenset[str]:
        """The activations `kept` names (ACT + name), with the tensors quantized upstream of them."""
        acts = {k[len(ACT):] for k in kept if k.startswith(ACT)}
        return frozenset(acts | {name for name, start in chains.items() if start in acts})

    def _make(self, float_graph: gs.Graph, done: dict[str, "_Layer"], params: dict[str, tuple[float, int]],
              chains: dict[str, str], kept: set[str]) -> gs.Graph:
        """The quantized graph with the layers and activations (ACT + name) in `kept` left in float."""
        return self.build(float_graph, {k: v for k, v in done.items() if k not in kept}, params, self._float_acts(chains, kept))

    def _bodies(self, graph: gs.Graph) -> list[str]:
        """Layers inside If/Loop/Scan bodies, whose activations calibration cannot reach: MatMul and
        Gemm dynamically, Conv with int8 per-channel weights (dequantized; activations float)."""
        notes = []
        for owner in [n for n in G.iter_nodes(graph) if n.subgraphs()]:
            for body in owner.subgraphs():
                layers, _ = W.quantizable_layers(body, frozenset({"MatMul", "Gemm", "Conv"}), self.exclude)
                for node in layers:
                    if node.op == "Conv":
                        s = W.layer_weight(node)
                        W.convert(body, node, 1, s, as_quantized(s.value, INT8, axis=0))
                    else:
                        dynamic_matmul(body, node)
                if layers:
                    notes.append(f"{owner.op} '{G.display_name(owner)}' body '{body.name}': {len(layers)} layers "
                                 "quantized (MatMul/Gemm dynamically, Conv weights int8; a body's activations are not "
                                 "calibrated)")
        return notes

    def _dynamic(self, graph: gs.Graph, lstms: int, body_notes: list[str]) -> PassResult:
        """activations="dynamic": MatMul and Gemm with int8 weights and run-time activation ranges."""
        layers, notes = W.quantizable_layers(graph, frozenset({"MatMul", "Gemm"}), self.exclude)
        notes = body_notes + notes
        convs = sum(n.op == "Conv" for n in graph.nodes)
        if convs:
            notes.append(f"{convs} Conv layers left in float: dynamic quantization covers MatMul, Gemm and LSTM "
                         "(onnxruntime's ConvInteger is slower than its float Conv); use the static default for them")
        for node in layers:
            dynamic_matmul(graph, node)
        stats = {"layers_quantized": len(layers) + lstms, "activations": "dynamic"}
        return PassResult(graph, bool(layers) or lstms > 0 or bool(body_notes), stats, notes)

    def build(self, float_graph: gs.Graph, chosen: dict[str, "_Layer"], params: dict[str, tuple[float, int]],
              float_acts: frozenset[str] = frozenset()) -> gs.Graph:
        """The float graph with the layers in `chosen` quantized as recorded and their activations
        at the calibrated `params`, except those named in `float_acts`."""
        graph = float_graph.copy()
        layers = [n for n in graph.nodes if G.layer_id(n) in chosen]
        for name, tensor in self._activations(graph, layers)[0].items():
            if name not in float_acts and name in params:   # (a walk upstream may reach further with fewer layers)
                Q.insert_qdq(graph, tensor, *params[name], layers)
        for node in layers:
            _write(graph, node, chosen[G.layer_id(node)])
        Q.pad_input_channels(graph, layers)
        return graph

    def _activations(self, graph: gs.Graph, layers: list[gs.Node]
                     ) -> tuple[dict[str, gs.Tensor], dict[str, str], dict[str, str]]:
        """The tensors to quantize; which of them take another's scale; and, for those quantized
        upstream of a layer's input, that input (mixed precision keeps such a chain in float
        together: one of its tensors alone would not take its rounding away). Each layer's
        input; its output (after a Relu/Clip it feeds alone) unless it reaches a graph output before
        any other quantized layer (a head's logits stay float: 8-bit logits over thousands of classes
        flip argmax decisions) or feeds only float layers; and upstream of a layer's input, through
        ops onnxruntime runs on uint8 codes (Flatten, MaxPool, ... sharing their input's scale) or
        with integer kernels of their own (average pools), the tensors that a quantized layer or a
        residual Add with quantized inputs produces: the MNIST ResNet's last Add, its pooling and
        Flatten then run in int8 instead of dequantizing before the pool."""
        outputs = {t.name for t in graph.outputs}
        ids = {id(n) for n in layers}

        def head(t: gs.Tensor) -> bool:          # reaches a graph output through unquantized ops only
            stack, seen = [t], {t.name}
            while stack:
                t = stack.pop()
                if t.name in outputs:
                    return True
                nxt = [o for n in t.outputs if id(n) not in ids for o in n.outputs if o.name not in seen]
                seen.update(o.name for o in nxt)
                stack.extend(nxt)
            return False

        acts: dict[str, gs.Tensor] = {}
        for node in layers:
            acts[node.inputs[0].name] = node.inputs[0]
            y = node.outputs[0]
            if len(y.outputs) == 1 and y.outputs[0].op in Q.ABSORBED and y.name not in outputs:
                y = y.outputs[0].outputs[0]
            feeds_float_layers = bool(y.outputs) and all(n.op in Q.FLOAT_GUARDED | {"MatMul"} and id(n) not in ids
                                                          for n in y.outputs)
            if not head(y) and not feeds_float_layers:
                acts[y.name] = y

        def quantized_source(t: gs.Tensor) -> bool:
            p = G.producer(t)
            if p is not None and p.op in Q.ABSORBED and len(p.inputs[0].outputs) == 1:
                p = G.producer(p.inputs[0])
            return p is not None and (id(p) in ids or p.op in ("Add", "Concat")
                                      and all(i.name in acts for i in p.inputs if not isinstance(i, gs.Constant)))

        ties: dict[str, str] = {}
        chains: dict[str, str] = {}
        for node in layers:
            x, chain = node.inputs[0], []
            while (p := G.producer(x)) is not None and p.op in Q.CODE_OPS | Q.QLINEAR_POOLS and p.inputs:
                chain.append((p, x))
                x = p.inputs[0]
                if x.name in acts or quantized_source(x):        # quantize the whole chain up to x
                    for op, out in chain:
                        if op.op in Q.CODE_OPS:
                            ties[out.name] = op.inputs[0].name
                        u = op.inputs[0]
                        if u.name not in acts:
                            acts[u.name] = u
                            chains[u.name] = node.inputs[0].name
                    break
        return acts, ties, chains

    def _quantize_weights(self, node: gs.Node, x_scale: float, grams: list[np.ndarray] | None) -> "_Layer":
        """One layer's weight as int8 codes (per channel) and its bias as int32 codes at input scale
        x weight scale, with the weight's relative error on the layer's inputs (or on its values)."""
        s = W.layer_weight(node)
        rows = out_rows(node, s.value).astype(np.float64)
        per_channel = self._per_channel(node)
        amax = np.abs(rows).max(1) if per_channel else np.full(rows.shape[0], np.abs(rows).max())
        scale = np.where(amax > Q.TINY, amax / 127, 1.0).astype(np.float32).astype(np.float64)
        grid = lambda v, sc: np.clip(np.round(v / sc), -127, 127) * sc
        groups = [] if grams is None else list(zip(group_slices(len(rows), len(grams)), grams))
        if groups and self.rounding == "gptq":
            new = np.concatenate([gptq(rows[part], gram, lambda col, j, sc=scale[part]: grid(col, sc))
                                  for part, gram in groups])
        else:
            new = grid(rows, scale[:, None])
        delta = np.zeros(rows.shape[0])
        if groups and self.bias_correction:                 # keep each output channel's mean
            delta = mean_shift(rows, new, groups)
        q = np.round(new / scale[:, None]).astype(np.int64)
        axis = out_axis(node) if per_channel else None
        weight = Quantized(from_out_rows(node, q, s.value.shape),
                           from_out_rows(node, np.broadcast_to(scale[:, None], rows.shape), s.value.shape).astype(np.float32),
                           np.zeros(s.value.shape, np.int64), INT8, axis, 0, True, ()).compact()
        return _Layer(weight, self._bias(node, x_scale * scale, delta, per_channel), _relative_error(rows, new, groups))

    def _per_channel(self, node: gs.Node) -> bool:
        """One weight scale per output channel, except for depthwise convs whose channels' ranges are
        alike (max over median of their max |w| at most DEPTHWISE_SPREAD), unless
        `depthwise_per_channel`: onnxruntime's int8 depthwise kernel is slower with per-channel
        scales and 8 bits per tensor keep such a conv's accuracy. PP-OCR cls at batch 1 against fp32
        (fp32 97.7%), measured before quantize folded BatchNorm itself: every depthwise per channel
        1.65x and 95.3%, all per tensor 1.1x and 96.9%, this rule (8 of 11 per channel) 1.47x and
        96.9%; PP-OCRv4 rec, whose BatchNorm-folded depthwise convs need their per-channel scales:
        84.4%, 76.6% and 83.6% of lines as fp32."""
        if not self.per_channel:
            return False
        w = W.layer_weight(node).value
        if self.depthwise_per_channel or not (node.op == "Conv" and int(node.attrs.get("group", 1)) > 1 and w.shape[1] == 1):
            return True
        return channel_spread(node, w) > DEPTHWISE_SPREAD

    @staticmethod
    def _bias(node: gs.Node, scale: np.ndarray, delta: np.ndarray, per_channel: bool) -> Quantized | None:
        """The bias (plus the correction) as int32 codes at input scale x weight scale (None for a
        MatMul, which has none, and for a Gemm bias that broadcasts)."""
        if node.op == "MatMul":
            return None
        b = W.layer_bias(node)
        if b is not None and b.value.size != len(scale):
            return None
        value = (np.zeros(len(scale)) if b is None else b.value.astype(np.float64).reshape(-1)) + delta
        sc = scale.astype(np.float32)
        q = np.clip(np.round(value / sc), -2 ** 31, 2 ** 31 - 1).astype(np.int64)
        axis = 0 if per_channel else None                  # one scale per tensor needs no axis (opset < 13)
        return Quantized(q, sc, np.zeros(len(sc), np.int64), onnx.TensorProto.INT32, axis, 0, True, ())


@dataclass
class _Layer:
    """What quantizing one layer produced: its weight and bias storages, the weight's error."""
    weight: Quantized
    bias: Quantized | None
    error: float


def _write(graph: gs.Graph, node: gs.Node, layer: _Layer) -> None:
    W.convert(graph, node, W.LAYERS[node.op].weight, W.layer_weight(node), layer.weight)
    if layer.bias is None:
        return
    index, b = W.LAYERS[node.op].bias, W.layer_bias(node)
    if b is None:
        G.set_constant(graph, node, index, np.zeros(layer.bias.q.shape, W.layer_weight(node).value.dtype), "_bias")
        b = W.layer_bias(node)
    W.convert(graph, node, index, b, layer.bias)


def _mixed_precision(p: Quantize, float_graph: gs.Graph, ids: set[str], done: dict[str, _Layer],
                     params: dict[str, tuple[float, int]], chains: dict[str, str], budget: float, ctx: Context,
                     data: Dataset, scorer: Scorer, stats: dict, notes: list[str], estimate: dict[str, float] | None
                     ) -> tuple[set[str], dict[str, _Layer]]:
    """What to keep in float so that the agreement with the float model on the calibration data is
    within `budget` points (`onnxcompress.precision`): the weights and activations whose
    quantization costs the most. Candidates: each layer (its weight and its input), and each
    quantized activation on its own (with the tensors quantized upstream of it, `chains`).
    Returns them and the layers' storages to build with.

    Refit weights compensate the quantization before them, so keeping one layer float leaves the
    later ones compensating an error that is gone (on a test model with one sensitive layer the
    search on refit weights kept all 6 candidates; PP-OCRv4 rec: 1 layer and 2 activations). When
    the search on the refit weights fails, or keeps more than PLAIN_SEARCH_SHARE of the candidates,
    it runs again on weights fit without the refit (rec: 39 layers and 74 activations) and the
    smaller set wins. The layers left quantized are then refit once more with the chosen ones in
    float, kept if that scores at least as well."""
    like = ctx.original
    model_of = lambda layers, kept: G.to_model(G.tidy(p._make(float_graph, layers, params, chains, kept)), like=like)
    candidates = list(done) + [ACT + name for name in params if name not in chains]
    measure = None if p.sensitivity == "estimated" else p.measure_top
    if scorer.resolution > budget:          # with few samples one changed answer is more than the budget
        notes.append(f"mixed precision: a budget of {budget:g} points is finer than one of the {len(scorer.data)} calibration "
                     f"samples it is scored on ({scorer.resolution:.2f} points); searched for at most one changed")
        budget = scorer.resolution
    searched = done
    found = search(candidates, lambda kept: model_of(done, kept), scorer, budget, estimate, measure)
    if p.refit and (not found.met or len(found.kept) > PLAIN_SEARCH_SHARE * len(candidates)):
        plain = p._fit(float_graph, ids, params, chains, set(), ctx, data, refit=False)[0]
        other = search(candidates, lambda kept: model_of(plain, kept), scorer, budget, estimate, measure)
        if other.met and (not found.met or len(other.kept) < len(found.kept)):
            searched, found = plain, replace(other, quantized_score=found.quantized_score)
    names = {G.layer_id(n): f"{n.op} '{G.display_name(n)}'" for n in float_graph.nodes}
    layers = [names[k] for k in found.kept if not k.startswith(ACT)]
    acts = [k[len(ACT):] for k in found.kept if k.startswith(ACT)]
    score, chosen = found.score, searched
    if found.kept and p.refit:
        refit = p._fit(float_graph, ids, params, chains, set(found.kept), ctx, data, refit=True)[0]
        if (again := scorer(model_of(refit, set(found.kept)))[0]) >= score:
            score, chosen = again, refit
    stats.update(layers_float=len(layers), activations_float=len(acts), int8_agreement=found.quantized_score,
                 agreement=score, precision_evaluations=found.evaluations)
    if found.kept:
        notes.append(f"mixed precision: {scorer.metric} with the float model on {len(scorer.data)} calibration samples "
                     f"{stats['int8_agreement']:.1f} with every layer int8, {score:.1f} with {len(layers)} layers and "
                     f"{len(acts)} activations kept in float (budget {budget:g} points)"
                     + (": layers " + ", ".join(layers) if layers else "") + ("; activations " + ", ".join(acts) if acts else "")
                     + ("; the others refit with those in float" if chosen is not searched else ""))
    return set(found.kept), chosen


def _kinds(float_graph: gs.Graph, done: dict[str, _Layer]) -> dict[str, set[str]]:
    """The quantized layers by kind, for `precision.faster_in_float`: the kinds whose int8 kernels
    can be slower than float ones (depthwise and grouped convs, layers reading a graph input, whose
    few input channels are padded for the int8 kernel)."""
    inputs = {t.name for t in float_graph.inputs}
    kinds: dict[str, set[str]] = {"depthwise convs": set(), "grouped convs": set(), "layers reading a graph input": set()}
    for node in float_graph.nodes:
        lid = G.layer_id(node)
        if lid not in done:
            continue
        if node.op == "Conv" and int(node.attrs.get("group", 1)) > 1:
            kinds["depthwise convs" if W.layer_weight(node).value.shape[1] == 1 else "grouped convs"].add(lid)
        if node.inputs[0].name in inputs:
            kinds["layers reading a graph input"].add(lid)
    return {k: v for k, v in kinds.items() if v}


def _tie_order(ties: dict[str, str]) -> list[str]:
    """The tied tensors, each after the one it copies its scale from (chains: Flatten after MaxPool)."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in ties and name not in order:
            visit(ties[name])
            order.append(name)
    for name in ties:
        visit(name)
    return order


def _relative_error(rows: np.ndarray, new: np.ndarray, groups: list[tuple[slice, np.ndarray]]) -> float:
    """||(W - Q) x|| / ||W x|| over the inputs (tr(D H D^T) / tr(W H W^T)), or over the weights."""
    d = rows - new
    if not groups:
        return float(np.sum(d ** 2) / max(np.sum(rows ** 2), 1e-30))
    quad = lambda a: sum(float(np.sum((a[part] @ h[:-1, :-1]) * a[part])) for part, h in groups)
    return float(quad(d) / max(quad(rows), 1e-30))
