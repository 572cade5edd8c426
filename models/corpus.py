"""A corpus of small, unusual ONNX models, built by hand with onnx.helper (no torch), for
`tests/test_corpus.py`: every registered pass runs on every model here with its default options.

    python models/corpus.py          # writes models/corpus/<name>.onnx and <name>.npz

Each model comes with a few calibration samples (`<name>.npz`, one array per graph input, batch
axis first: what `--calib` reads). Seeds are fixed, so a rerun writes the same files; every file
stays well under 200 KB. `CORPUS` below says what each model covers.

Models whose inputs have no batch axis first (a scalar, a recurrent state [layers, batch, hidden])
get calibration files in the feeds layout of `onnxcompress.data` instead (axis 0 indexes complete
feeds, declared by '__layout__': 'feeds'); `NOTES` says which and how.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto as T, helper as h, numpy_helper

OUT = Path(__file__).resolve().parent / "corpus"
SAMPLES = 12

# name -> (what it covers, opset); filled by @model
CORPUS: dict[str, tuple[str, int]] = {}
BUILDERS: dict[str, Callable[[], tuple[onnx.ModelProto, dict[str, np.ndarray]]]] = {}
# How the calibration files of models without a batch-first axis are laid out (see the module docstring).
NOTES = {
    "scalar_input": "input 'temperature' is a scalar (rank 0, no batch axis): the .npz declares the feeds "
                    "layout ('__layout__': 'feeds'), each feed x [1, 10] with its own 0-d temperature",
    "gru_state": "input 'h0' is [layers=1, batch, hidden] (batch on axis 1): the .npz declares the feeds layout, "
                 "each feed x [1, 4, 6] and h0 [1, 1, 8]",
    "gru_state2": "input 'h0' is [layers=2, batch, hidden] (batch on axis 1): the .npz declares the feeds layout, "
                  "each feed x [2, 3, 3] (two sequences) and h0 [2, 2, 4]",
    "crnn_seqfirst": "batch fixed to 1 and sequence-first inside: the .npz declares the feeds layout, each feed a "
                     "text line x [1, 1, 16, 24] (lines of other widths: a folder of one .npz per feed)",
}
FEEDS = np.asarray("feeds")      # the layout declaration stored under '__layout__'


def model(doc: str, opset: int):
    def wrap(fn):
        CORPUS[fn.__name__] = (doc, opset)
        BUILDERS[fn.__name__] = fn
        return fn
    return wrap


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def w(r: np.random.Generator, *shape, scale: float | None = None) -> np.ndarray:
    """Weights with fan-in scaling (outputs stay O(1) through a few layers)."""
    fan = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    s = scale if scale is not None else 1.0 / np.sqrt(max(fan, 1))
    return (r.standard_normal(shape) * s).astype(np.float32)


def init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def vi(name: str, shape, elem=T.FLOAT) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def build(nodes, inputs, outputs, inits, opset: int, name: str, ir: int | None = None) -> onnx.ModelProto:
    graph = h.make_graph(nodes, name, inputs, outputs, inits)
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="onnxcompress-corpus")
    m.ir_version = ir or max(7, onnx.helper.find_min_ir_version_for(list(m.opset_import), True))
    return m


def images(r, n=SAMPLES, c=3, s=8) -> np.ndarray:
    return r.standard_normal((n, c, s, s)).astype(np.float32)


def conv_params(r, cout, cin, k, prefix):
    return [init(f"{prefix}.w", w(r, cout, cin, k, k)), init(f"{prefix}.b", w(r, cout, scale=0.1))]


def bn_params(r, c, prefix):
    return [init(f"{prefix}.scale", r.uniform(0.5, 1.5, c).astype(np.float32)),
            init(f"{prefix}.bias", (r.standard_normal(c) * 0.1).astype(np.float32)),
            init(f"{prefix}.mean", (r.standard_normal(c) * 0.1).astype(np.float32)),
            init(f"{prefix}.var", r.uniform(0.5, 1.5, c).astype(np.float32))]


def bn(prefix, x, y):
    return h.make_node("BatchNormalization", [x, f"{prefix}.scale", f"{prefix}.bias", f"{prefix}.mean", f"{prefix}.var"],
                       [y], name=prefix)


# --------------------------------------------------------------------------- recurrent
@model("LSTM (seq-first, transposed from batch-first input), per-step linear head -> [N, T, 5]", 17)
def lstm():
    r, H, F, Tn = rng(1), 16, 8, 6
    nodes = [h.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             h.make_node("LSTM", ["xt", "W", "R", "B"], ["Y", "Y_h", "Y_c"], hidden_size=H, name="lstm"),
             h.make_node("Squeeze", ["Y", "ax1"], ["ys"]),
             h.make_node("Transpose", ["ys"], ["yb"], perm=[1, 0, 2]),
             h.make_node("MatMul", ["yb", "head.w"], ["hm"], name="head"),
             h.make_node("Add", ["hm", "head.b"], ["logits"])]
    inits = [init("W", w(r, 1, 4 * H, F)), init("R", w(r, 1, 4 * H, H)), init("B", w(r, 1, 8 * H, scale=0.1)),
             init("ax1", np.array([1], np.int64)), init("head.w", w(r, 5, H).T.copy()), init("head.b", w(r, 5, scale=0.1))]
    m = build(nodes, [vi("x", ["N", Tn, F])], [vi("logits", ["N", Tn, 5])], inits, 17, "lstm")
    return m, {"x": r.standard_normal((SAMPLES, Tn, F)).astype(np.float32)}


@model("text recognizer as PaddleOCR-style CRNNs export it (opset 12): batch fixed to 1, input [1, 1, 16, W], two "
       "strided convs, columns to a sequence-first LSTM [T, 1, 64], per-step MatMul head -> [T, 1, 10]", 12)
def crnn_seqfirst():
    r, H = rng(4), 16
    nodes = [h.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="c1"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="c2"),
             h.make_node("Relu", ["c2"], ["r2"]),
             h.make_node("Transpose", ["r2"], ["cols"], perm=[3, 0, 1, 2]),          # [T, 1, 16, 4]
             h.make_node("Reshape", ["cols", "seq_shape"], ["seq"]),                 # [T, 1, 64]
             h.make_node("LSTM", ["seq", "W", "R", "B"], ["Y"], hidden_size=H, name="lstm"),
             h.make_node("Squeeze", ["Y"], ["ys"], axes=[1]),                        # [T, 1, H]
             h.make_node("MatMul", ["ys", "head.w"], ["hm"], name="head"),
             h.make_node("Add", ["hm", "head.b"], ["logits"])]
    inits = [*conv_params(r, 8, 1, 3, "c1"), *conv_params(r, 16, 8, 3, "c2"), init("seq_shape", np.array([0, 0, -1], np.int64)),
             init("W", w(r, 1, 4 * H, 64)), init("R", w(r, 1, 4 * H, H)), init("B", w(r, 1, 8 * H, scale=0.1)),
             init("head.w", w(r, H, 10)), init("head.b", w(r, 10, scale=0.1))]
    m = build(nodes, [vi("x", [1, 1, 16, "W"])], [vi("logits", ["T", 1, 10])], inits, 12, "crnn_seqfirst")
    return m, {"x": r.standard_normal((SAMPLES, 1, 1, 16, 24)).astype(np.float32), "__layout__": FEEDS}   # see NOTES


@model("bidirectional GRU (linear_before_reset), last hidden states -> Gemm classifier", 17)
def gru():
    r, H, F, Tn = rng(2), 12, 8, 5
    nodes = [h.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             h.make_node("GRU", ["xt", "W", "R", "B"], ["", "Y_h"], hidden_size=H, direction="bidirectional",
                         linear_before_reset=1, name="gru"),
             h.make_node("Transpose", ["Y_h"], ["hb"], perm=[1, 0, 2]),
             h.make_node("Flatten", ["hb"], ["hf"], axis=1),
             h.make_node("Gemm", ["hf", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    inits = [init("W", w(r, 2, 3 * H, F)), init("R", w(r, 2, 3 * H, H)), init("B", w(r, 2, 6 * H, scale=0.1)),
             init("fc.w", w(r, 4, 2 * H)), init("fc.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("x", ["N", Tn, F])], [vi("logits", ["N", 4])], inits, 17, "gru")
    return m, {"x": r.standard_normal((SAMPLES, Tn, F)).astype(np.float32)}


@model("GRU with a recurrent state input h0 [layers=1, batch, hidden] and the new state as a second output", 17)
def gru_state():
    r, H, F, Tn = rng(3), 8, 6, 4
    nodes = [h.make_node("MatMul", ["x", "proj.w"], ["xp"], name="proj"),
             h.make_node("Transpose", ["xp"], ["xt"], perm=[1, 0, 2]),
             h.make_node("GRU", ["xt", "W", "R", "B", "", "h0"], ["", "h1"], hidden_size=H, name="gru"),
             h.make_node("Squeeze", ["h1", "ax0"], ["hs"]),
             h.make_node("Gemm", ["hs", "fc.w", "fc.b"], ["logits"], name="fc")]
    inits = [init("proj.w", w(r, F, F)), init("W", w(r, 1, 3 * H, F)), init("R", w(r, 1, 3 * H, H)),
             init("B", w(r, 1, 6 * H, scale=0.1)), init("ax0", np.array([0], np.int64)),
             init("fc.w", w(r, H, 5)), init("fc.b", w(r, 5, scale=0.1))]
    m = build(nodes, [vi("x", ["N", Tn, F]), vi("h0", [1, "N", H])], [vi("logits", ["N", 5]), vi("h1", [1, "N", H])],
              inits, 17, "gru_state")
    data = {"x": r.standard_normal((SAMPLES, 1, Tn, F)).astype(np.float32),       # feeds (see NOTES)
            "h0": (r.standard_normal((SAMPLES, 1, 1, H)) * 0.5).astype(np.float32), "__layout__": FEEDS}
    return m, data


@model("two stacked GRUs with the recurrent state h0 [layers=2, batch, hidden] (batch on axis 1) in and out", 17)
def gru_state2():
    r, H, F, Tn = rng(8), 4, 3, 3
    nodes = [h.make_node("Split", ["h0", "split"], ["ha", "hb"], axis=0),
             h.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             h.make_node("GRU", ["xt", "W1", "R1", "", "", "ha"], ["Y1", "h1"], hidden_size=H, name="gru1"),
             h.make_node("Squeeze", ["Y1", "ax1"], ["y1"]),
             h.make_node("GRU", ["y1", "W2", "R2", "", "", "hb"], ["", "h2"], hidden_size=H, name="gru2"),
             h.make_node("Concat", ["h1", "h2"], ["hn"], axis=0)]
    inits = [init("split", np.array([1, 1], np.int64)), init("ax1", np.array([1], np.int64)),
             init("W1", w(r, 1, 3 * H, F)), init("R1", w(r, 1, 3 * H, H)), init("W2", w(r, 1, 3 * H, H)), init("R2", w(r, 1, 3 * H, H))]
    m = build(nodes, [vi("x", ["N", Tn, F]), vi("h0", [2, "N", H])], [vi("hn", [2, "N", H])], inits, 17, "gru_state2")
    data = {"x": r.standard_normal((SAMPLES, 2, Tn, F)).astype(np.float32),       # feeds (see NOTES)
            "h0": (r.standard_normal((SAMPLES, 2, 2, H)) * 0.5).astype(np.float32), "__layout__": FEEDS}
    return m, data


# --------------------------------------------------------------------------- control flow
@model("If whose branches hold their own weights (MatMul in each body) between two top-level layers", 17)
def if_branches():
    r, D = rng(4), 8
    then_g = h.make_graph([h.make_node("MatMul", ["a", "then.w"], ["tm"], name="then_mm"),
                           h.make_node("Add", ["tm", "then.b"], ["t_out"])],
                          "then", [], [vi("t_out", None)], [init("then.w", w(r, D, D)), init("then.b", w(r, D, scale=0.1))])
    else_g = h.make_graph([h.make_node("MatMul", ["a", "else.w"], ["em"], name="else_mm"),
                           h.make_node("Relu", ["em"], ["e_out"])],
                          "else", [], [vi("e_out", None)], [init("else.w", w(r, D, D))])
    nodes = [h.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["a"], name="fc1"),
             h.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             h.make_node("Greater", ["s", "zero"], ["cond"]),
             h.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"),
             h.make_node("Gemm", ["branch", "fc2.w", "fc2.b"], ["logits"], name="fc2")]
    inits = [init("fc1.w", w(r, 10, D)), init("fc1.b", w(r, D, scale=0.1)), init("zero", np.array(0, np.float32)),
             init("fc2.w", w(r, D, 4)), init("fc2.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("x", ["N", 10])], [vi("logits", ["N", 4])], inits, 17, "if_branches")
    return m, {"x": r.standard_normal((SAMPLES, 10)).astype(np.float32)}


@model("Loop (3 steps) whose body reads an outer-scope weight initializer that a top-level MatMul also reads", 17)
def loop_outer():
    r, D = rng(5), 8
    body = h.make_graph([h.make_node("Identity", ["cond_in"], ["cond_out"]),
                         h.make_node("MatMul", ["h_in", "shared.w"], ["bm"], name="body_mm"),
                         h.make_node("Add", ["bm", "body.b"], ["ba"]),
                         h.make_node("Tanh", ["ba"], ["h_out"])],
                        "body", [vi("i", [], T.INT64), vi("cond_in", [], T.BOOL), vi("h_in", None)],
                        [vi("cond_out", [], T.BOOL), vi("h_out", None)])
    nodes = [h.make_node("MatMul", ["x", "shared.w"], ["h0"], name="first"),
             h.make_node("Loop", ["trips", "true", "h0"], ["h3"], body=body, name="loop"),
             h.make_node("MatMul", ["h3", "head.w"], ["logits"], name="head")]
    inits = [init("shared.w", w(r, D, D)), init("body.b", w(r, D, scale=0.1)), init("trips", np.array(3, np.int64)),
             init("true", np.array(True)), init("head.w", w(r, D, 4))]
    m = build(nodes, [vi("x", ["N", D])], [vi("logits", ["N", 4])], inits, 17, "loop_outer")
    return m, {"x": r.standard_normal((SAMPLES, D)).astype(np.float32)}


# --------------------------------------------------------------------------- transformers
def _attention_block(r, D: int, heads: int, ffn: int, gelu_op: bool):
    dh = D // heads
    nodes, inits = [], []

    def lin(name, x, y, fan_in, fan_out):
        nodes.extend([h.make_node("MatMul", [x, f"{name}.w"], [f"{y}_mm"], name=name),
                      h.make_node("Add", [f"{y}_mm", f"{name}.b"], [y])])
        inits.extend([init(f"{name}.w", w(r, fan_out, fan_in).T.copy()), init(f"{name}.b", w(r, fan_out, scale=0.1))])

    inits += [init("ln1.g", np.ones(D, np.float32)), init("ln1.b", np.zeros(D, np.float32)),
              init("ln2.g", r.uniform(0.8, 1.2, D).astype(np.float32)), init("ln2.b", np.zeros(D, np.float32)),
              init("heads_shape", np.array([0, 0, heads, dh], np.int64)), init("model_shape", np.array([0, 0, D], np.int64)),
              init("scale", np.array(1 / np.sqrt(dh), np.float32))]
    nodes.append(h.make_node("LayerNormalization", ["x", "ln1.g", "ln1.b"], ["n1"], axis=-1, epsilon=1e-5, name="ln1"))
    for p in "qkv":
        lin(p, "n1", p, D, D)
        nodes.append(h.make_node("Reshape", [p, "heads_shape"], [f"{p}4"]))
    nodes += [h.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              h.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 3, 1]),
              h.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
              h.make_node("MatMul", ["qh", "kh"], ["scores"], name="qk"),
              h.make_node("Mul", ["scores", "scale"], ["scaled"]),
              h.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
              h.make_node("MatMul", ["probs", "vh"], ["ctx"], name="pv"),
              h.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              h.make_node("Reshape", ["ctx_t", "model_shape"], ["ctx_m"])]
    lin("o", "ctx_m", "attn", D, D)
    nodes += [h.make_node("Add", ["x", "attn"], ["res1"]),
              h.make_node("LayerNormalization", ["res1", "ln2.g", "ln2.b"], ["n2"], axis=-1, epsilon=1e-5, name="ln2")]
    lin("ffn1", "n2", "f1", D, ffn)
    if gelu_op:
        nodes.append(h.make_node("Gelu", ["f1"], ["g"], name="gelu"))
    else:   # GELU written out with Erf, as exporters before opset 20 do
        inits += [init("sqrt2", np.array(np.sqrt(2.0), np.float32)), init("one", np.array(1.0, np.float32)),
                  init("half", np.array(0.5, np.float32))]
        nodes += [h.make_node("Div", ["f1", "sqrt2"], ["gd"]), h.make_node("Erf", ["gd"], ["ge"]),
                  h.make_node("Add", ["ge", "one"], ["gp"]), h.make_node("Mul", ["f1", "gp"], ["gm"]),
                  h.make_node("Mul", ["gm", "half"], ["g"])]
    lin("ffn2", "g", "f2", ffn, D)
    nodes.append(h.make_node("Add", ["res1", "f2"], ["y"]))
    return nodes, inits


@model("Transformer encoder block: LayerNormalization, 2-head MatMul attention, Softmax, GELU as Erf ops", 17)
def transformer():
    r, D, S = rng(6), 16, 6
    nodes, inits = _attention_block(r, D, 2, 32, gelu_op=False)
    m = build(nodes, [vi("x", ["N", S, D])], [vi("y", ["N", S, D])], inits, 17, "transformer")
    return m, {"x": r.standard_normal((SAMPLES, S, D)).astype(np.float32)}


@model("the same encoder block with the Gelu op (opset 20) and a mean-pooled classifier head", 20)
def transformer_gelu20():
    r, D, S = rng(7), 16, 6
    nodes, inits = _attention_block(r, D, 2, 32, gelu_op=True)
    nodes += [h.make_node("ReduceMean", ["y", "ax1"], ["pooled"], keepdims=0),
              h.make_node("Gemm", ["pooled", "cls.w", "cls.b"], ["logits"], transB=1, name="cls")]
    inits += [init("ax1", np.array([1], np.int64)), init("cls.w", w(r, 3, D)), init("cls.b", w(r, 3, scale=0.1))]
    m = build(nodes, [vi("x", ["N", S, D])], [vi("logits", ["N", 3])], inits, 20, "transformer_gelu20")
    return m, {"x": r.standard_normal((SAMPLES, S, D)).astype(np.float32)}


# --------------------------------------------------------------------------- conv nets by opset
@model("conv net at opset 11: Conv+BN+Relu, MaxPool, Conv, GlobalAveragePool, Squeeze(axes attribute), Gemm", 11)
def conv_op11():
    r = rng(11)
    nodes = [h.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], name="c1"), bn("bn1", "c1", "b1"),
             h.make_node("Relu", ["b1"], ["r1"]), h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             h.make_node("Conv", ["p1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1], name="c2"),
             h.make_node("Relu", ["c2"], ["r2"]), h.make_node("GlobalAveragePool", ["r2"], ["g"]),
             h.make_node("Squeeze", ["g"], ["sq"], axes=[2, 3]),
             h.make_node("Gemm", ["sq", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    inits = conv_params(r, 8, 3, 3, "c1") + bn_params(r, 8, "bn1") + conv_params(r, 16, 8, 3, "c2") + \
        [init("fc.w", w(r, 4, 16)), init("fc.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("x", ["N", 3, 8, 8])], [vi("logits", ["N", 4])], inits, 11, "conv_op11")
    return m, {"x": images(r)}


@model("conv net at opset 13: residual Add, BN, Clip(min/max inputs) as ReLU6, Flatten, Gemm", 13)
def conv_op13():
    r = rng(13)
    nodes = [h.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "c2.w"], ["c2"], pads=[1, 1, 1, 1], name="c2"), bn("bn2", "c2", "b2"),
             h.make_node("Add", ["r1", "b2"], ["res"]),
             h.make_node("Clip", ["res", "lo", "hi"], ["r6"]),
             h.make_node("GlobalAveragePool", ["r6"], ["g"]), h.make_node("Flatten", ["g"], ["f"]),
             h.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    inits = conv_params(r, 8, 3, 3, "c1") + [init("c2.w", w(r, 8, 8, 3, 3))] + bn_params(r, 8, "bn2") + \
        [init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32)),
         init("fc.w", w(r, 4, 8)), init("fc.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("x", ["N", 3, 8, 8])], [vi("logits", ["N", 4])], inits, 13, "conv_op13")
    return m, {"x": images(r)}


@model("conv net at opset 17: strided stem, depthwise (group) conv + BN, pointwise conv, HardSwish", 17)
def conv_op17():
    r = rng(17)
    nodes = [h.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="stem"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "dw.w"], ["dw"], pads=[1, 1, 1, 1], group=8, name="dw"), bn("bn_dw", "dw", "bdw"),
             h.make_node("Relu", ["bdw"], ["r2"]),
             h.make_node("Conv", ["r2", "pw.w", "pw.b"], ["pw"], name="pw"), h.make_node("HardSwish", ["pw"], ["hs"]),
             h.make_node("GlobalAveragePool", ["hs"], ["g"]), h.make_node("Flatten", ["g"], ["f"]),
             h.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    inits = conv_params(r, 8, 3, 3, "c1") + [init("dw.w", w(r, 8, 1, 3, 3))] + bn_params(r, 8, "bn_dw") + \
        conv_params(r, 16, 8, 1, "pw") + [init("fc.w", w(r, 4, 16)), init("fc.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("x", ["N", 3, 8, 8])], [vi("logits", ["N", 4])], inits, 17, "conv_op17")
    return m, {"x": images(r)}


@model("conv encoder-decoder at opset 21: strided Conv, ConvTranspose upsampling, Sigmoid map [N, 1, 8, 8]", 21)
def conv_op21():
    r = rng(21)
    nodes = [h.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="c2"),
             h.make_node("Relu", ["c2"], ["r2"]),
             h.make_node("ConvTranspose", ["r2", "up.w", "up.b"], ["up"], strides=[2, 2], kernel_shape=[2, 2], name="up"),
             h.make_node("Relu", ["up"], ["r3"]),
             h.make_node("Conv", ["r3", "out.w", "out.b"], ["o"], name="out"),
             h.make_node("Sigmoid", ["o"], ["map"])]
    inits = conv_params(r, 8, 3, 3, "c1") + conv_params(r, 16, 8, 3, "c2") + \
        [init("up.w", w(r, 16, 8, 2, 2)), init("up.b", w(r, 8, scale=0.1))] + conv_params(r, 1, 8, 1, "out")
    m = build(nodes, [vi("x", ["N", 3, 8, 8])], [vi("map", ["N", 1, 8, 8])], inits, 21, "conv_op21")
    return m, {"x": images(r)}


# --------------------------------------------------------------------------- weight storage
@model("weights in Constant nodes (Conv weight, bias through Identity, Gemm weight), no initializers", 13)
def constant_weights():
    r = rng(30)
    const = lambda name, v: h.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name + "_value"))
    nodes = [const("c1.w", w(r, 8, 3, 3, 3)), const("c1.b_raw", w(r, 8, scale=0.1)),
             h.make_node("Identity", ["c1.b_raw"], ["c1.b"]),
             h.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="c1"),
             h.make_node("Relu", ["c1"], ["r1"]), h.make_node("Flatten", ["r1"], ["f"]),
             const("fc.w", w(r, 4, 8 * 4 * 4)), const("fc.b", w(r, 4, scale=0.1)),
             h.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    m = build(nodes, [vi("x", ["N", 3, 8, 8])], [vi("logits", ["N", 4])], [], 13, "constant_weights")
    return m, {"x": images(r)}


@model("old-exporter style: every initializer also listed as a graph input (opset 9, IR 4), Gemm-Relu-Gemm", 9)
def init_as_inputs():
    r = rng(31)
    nodes = [h.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["a"], transB=1, name="fc1"), h.make_node("Relu", ["a"], ["ra"]),
             h.make_node("Gemm", ["ra", "fc2.w", "fc2.b"], ["logits"], transB=1, name="fc2")]
    inits = [init("fc1.w", w(r, 16, 10)), init("fc1.b", w(r, 16, scale=0.1)), init("fc2.w", w(r, 4, 16)),
             init("fc2.b", w(r, 4, scale=0.1))]
    inputs = [vi("x", ["N", 10])] + [vi(t.name, list(t.dims)) for t in inits]
    m = build(nodes, inputs, [vi("logits", ["N", 4])], inits, 9, "init_as_inputs", ir=4)
    return m, {"x": r.standard_normal((SAMPLES, 10)).astype(np.float32)}


@model("already quantized, QDQ: uint8 activations, int8 per-channel conv weights, int32 bias, per-tensor Gemm", 13)
def qdq_static():
    r = rng(32)
    wc = w(r, 8, 3, 3, 3)
    sc = (np.abs(wc).reshape(8, -1).max(1) / 127).astype(np.float32)
    qc = np.clip(np.round(wc / sc[:, None, None, None]), -127, 127).astype(np.int8)
    bias = w(r, 8, scale=0.1)
    sx = np.float32(4 / 255)
    qb = np.round(bias / (sx * sc)).astype(np.int32)
    wf = w(r, 4, 8 * 4 * 4)
    sf = np.float32(np.abs(wf).max() / 127)
    qf = np.clip(np.round(wf / sf), -127, 127).astype(np.int8)
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             h.make_node("DequantizeLinear", ["c1.wq", "c1.ws", "c1.wz"], ["c1.w"], axis=0),
             h.make_node("DequantizeLinear", ["c1.bq", "c1.bs"], ["c1.b"], axis=0),
             h.make_node("Conv", ["xd", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="c1"),
             h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("QuantizeLinear", ["r1", "sa", "za"], ["aq"]), h.make_node("DequantizeLinear", ["aq", "sa", "za"], ["ad"]),
             h.make_node("Flatten", ["ad"], ["f"]),
             h.make_node("DequantizeLinear", ["fc.wq", "fc.ws", "fc.wz"], ["fc.w"]),
             h.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    inits = [init("sx", sx), init("zx", np.uint8(128)), init("c1.wq", qc), init("c1.ws", sc), init("c1.wz", np.zeros(8, np.int8)),
             init("c1.bq", qb), init("c1.bs", (sx * sc).astype(np.float32)),
             init("sa", np.float32(3 / 255)), init("za", np.uint8(0)),
             init("fc.wq", qf), init("fc.ws", sf), init("fc.wz", np.int8(0)), init("fc.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("x", ["N", 3, 8, 8])], [vi("logits", ["N", 4])], inits, 13, "qdq_static")
    return m, {"x": images(r)}


@model("dynamically quantized: DynamicQuantizeLinear -> ConvInteger and MatMulInteger, rescaled by Mul", 13)
def dynamic_int():
    r = rng(33)
    wc = w(r, 8, 3, 3, 3)
    sc = np.float32(np.abs(wc).max() / 127)
    qc = (np.clip(np.round(wc / sc), -127, 127) + 128).astype(np.uint8)     # uint8 codes, zero point 128
    wm = w(r, 8 * 4 * 4, 4)
    sm = np.float32(np.abs(wm).max() / 127)
    qm = np.clip(np.round(wm / sm), -127, 127).astype(np.int8)
    nodes = [h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             h.make_node("ConvInteger", ["xq", "c1.wq", "xz", "c1.wz"], ["ci"], pads=[1, 1, 1, 1], strides=[2, 2], name="c1"),
             h.make_node("Cast", ["ci"], ["cf"], to=T.FLOAT),
             h.make_node("Mul", ["xs", "c1.ws"], ["cs"]), h.make_node("Mul", ["cf", "cs"], ["c1"]),
             h.make_node("Relu", ["c1"], ["r1"]), h.make_node("Flatten", ["r1"], ["f"]),
             h.make_node("DynamicQuantizeLinear", ["f"], ["fq", "fs", "fz"]),
             h.make_node("MatMulInteger", ["fq", "fc.wq", "fz", "fc.wz"], ["mi"], name="fc"),
             h.make_node("Cast", ["mi"], ["mf"], to=T.FLOAT),
             h.make_node("Mul", ["fs", "fc.ws"], ["ms"]), h.make_node("Mul", ["mf", "ms"], ["logits"])]
    inits = [init("c1.wq", qc), init("c1.wz", np.uint8(128)), init("c1.ws", sc),
             init("fc.wq", qm), init("fc.wz", np.int8(0)), init("fc.ws", sm)]
    m = build(nodes, [vi("x", ["N", 3, 8, 8])], [vi("logits", ["N", 4])], inits, 13, "dynamic_int")
    return m, {"x": images(r)}


# --------------------------------------------------------------------------- inputs and outputs
@model("batch dimension fixed to 1 ([1, 3, 8, 8] -> [1, 4]): conv, BN, pool, Gemm", 17)
def batch1():
    r = rng(40)
    nodes = [h.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], name="c1"), bn("bn1", "c1", "b1"),
             h.make_node("Relu", ["b1"], ["r1"]),
             h.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1], name="c2"), h.make_node("Relu", ["c2"], ["r2"]),
             h.make_node("GlobalAveragePool", ["r2"], ["g"]), h.make_node("Flatten", ["g"], ["f"]),
             h.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    inits = conv_params(r, 8, 3, 3, "c1") + bn_params(r, 8, "bn1") + conv_params(r, 16, 8, 3, "c2") + \
        [init("fc.w", w(r, 4, 16)), init("fc.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("x", [1, 3, 8, 8])], [vi("logits", [1, 4])], inits, 17, "batch1")
    return m, {"x": images(r)}   # several samples: the runtime feeds a fixed-batch model one at a time


@model("an extra scalar input (rank 0, no batch axis): logits divided by a 'temperature', then Softmax", 17)
def scalar_input():
    r = rng(41)
    nodes = [h.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["a"], transB=1, name="fc1"), h.make_node("Relu", ["a"], ["ra"]),
             h.make_node("Gemm", ["ra", "fc2.w", "fc2.b"], ["z"], transB=1, name="fc2"),
             h.make_node("Div", ["z", "temperature"], ["zt"]), h.make_node("Softmax", ["zt"], ["probs"], axis=-1)]
    inits = [init("fc1.w", w(r, 16, 10)), init("fc1.b", w(r, 16, scale=0.1)), init("fc2.w", w(r, 4, 16)),
             init("fc2.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("x", ["N", 10]), vi("temperature", [])], [vi("probs", ["N", 4])], inits, 17, "scalar_input")
    return m, {"x": r.standard_normal((SAMPLES, 1, 10)).astype(np.float32), "__layout__": FEEDS,   # feeds (see NOTES)
               "temperature": r.uniform(0.5, 4.0, SAMPLES).astype(np.float32)}


@model("two inputs (image + vector), two outputs (logits, embedding): conv and MLP branches joined by Concat", 17)
def multi_io():
    r = rng(42)
    nodes = [h.make_node("Conv", ["image", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], name="c1"), h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("GlobalAveragePool", ["r1"], ["g"]), h.make_node("Flatten", ["g"], ["gf"]),
             h.make_node("Gemm", ["vec", "v1.w", "v1.b"], ["v1"], transB=1, name="v1"), h.make_node("Relu", ["v1"], ["rv"]),
             h.make_node("Concat", ["gf", "rv"], ["cat"], axis=1),
             h.make_node("Gemm", ["cat", "emb.w", "emb.b"], ["embedding"], transB=1, name="emb"),
             h.make_node("Relu", ["embedding"], ["re"]),
             h.make_node("Gemm", ["re", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    inits = conv_params(r, 8, 3, 3, "c1") + [init("v1.w", w(r, 8, 6)), init("v1.b", w(r, 8, scale=0.1)),
                                             init("emb.w", w(r, 8, 16)), init("emb.b", w(r, 8, scale=0.1)),
                                             init("fc.w", w(r, 4, 8)), init("fc.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("image", ["N", 3, 8, 8]), vi("vec", ["N", 6])],
              [vi("logits", ["N", 4]), vi("embedding", ["N", 8])], inits, 17, "multi_io")
    return m, {"image": images(r), "vec": r.standard_normal((SAMPLES, 6)).astype(np.float32)}


@model("int64 token ids [N, 6] into an embedding Gather (+ position embedding), mean-pooled, Gemm classifier", 17)
def embedding():
    r, V, D, S = rng(43), 40, 16, 6
    nodes = [h.make_node("Gather", ["tok.emb", "tokens"], ["e"], axis=0, name="tok_emb"),
             h.make_node("Add", ["e", "pos.emb"], ["ep"]),
             h.make_node("ReduceMean", ["ep"], ["pooled"], axes=[1], keepdims=0),
             h.make_node("Gemm", ["pooled", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    inits = [init("tok.emb", w(r, V, D, scale=1.0)), init("pos.emb", w(r, S, D, scale=0.1)),
             init("fc.w", w(r, 5, D)), init("fc.b", w(r, 5, scale=0.1))]
    m = build(nodes, [vi("tokens", ["N", S], T.INT64)], [vi("logits", ["N", 5])], inits, 17, "embedding")
    return m, {"tokens": r.integers(0, V, (SAMPLES, S)).astype(np.int64)}


@model("saved with external data (external_data.onnx + external_data.onnx.data): Gemm-Relu-Gemm-Relu-Gemm", 17)
def external_data():
    r = rng(44)
    nodes = [h.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["a"], transB=1, name="fc1"), h.make_node("Relu", ["a"], ["ra"]),
             h.make_node("Gemm", ["ra", "fc2.w", "fc2.b"], ["b"], transB=1, name="fc2"), h.make_node("Relu", ["b"], ["rb"]),
             h.make_node("Gemm", ["rb", "fc3.w", "fc3.b"], ["logits"], transB=1, name="fc3")]
    inits = [init("fc1.w", w(r, 32, 16)), init("fc1.b", w(r, 32, scale=0.1)), init("fc2.w", w(r, 32, 32)),
             init("fc2.b", w(r, 32, scale=0.1)), init("fc3.w", w(r, 4, 32)), init("fc3.b", w(r, 4, scale=0.1))]
    m = build(nodes, [vi("x", ["N", 16])], [vi("logits", ["N", 4])], inits, 17, "external_data")
    return m, {"x": r.standard_normal((SAMPLES, 16)).astype(np.float32)}


EXTERNAL = {"external_data"}


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with a fixed timestamp in the zip, so that a rerun writes the same bytes."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for key, value in arrays.items():
            with z.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)




def check(name: str, m: onnx.ModelProto, data: dict[str, np.ndarray]) -> None:
    """The model passes the full checker and runs in onnxruntime on its first calibration sample."""
    import onnxruntime as ort

    onnx.checker.check_model(m, full_check=True)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = "__layout__" in data                      # the first feed, or the first sample
    feed = {k: np.asarray(v[0] if feeds else v[:1]) for k, v in data.items() if k != "__layout__"}
    sess.run(None, feed)


def write(out: Path = OUT, names: list[str] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or list(BUILDERS):
        m, data = BUILDERS[name]()
        check(name, m, data)
        path = out / f"{name}.onnx"
        if name in EXTERNAL:
            data_file = f"{name}.onnx.data"
            (out / data_file).unlink(missing_ok=True)
            onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file, size_threshold=0)
            written.append(out / data_file)
        else:
            onnx.save_model(m, str(path))
        save_npz(out / f"{name}.npz", data)
        written += [path, out / f"{name}.npz"]
    return written


if __name__ == "__main__":
    for p in write(names=sys.argv[1:] or None):
        print(f"{p.relative_to(OUT.parent.parent)}: {p.stat().st_size} bytes")
    for name, note in NOTES.items():
        print(f"note: {name}: {note}")
