"""The weight view (onnxcompress.weights) against onnxruntime: for every storage kind, the value it
reads is what onnxruntime computes with, a write keeps the storage, a take slices every piece;
plus the storage summary and the int32 bias rule of integer kernels."""
import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP, helper, numpy_helper

from conftest import rand
from onnxcompress import graph as G, weights as W


def node(op, ins, out="y", **attrs):
    return helper.make_node(op, ins, [out], domain="com.microsoft" if op == "MatMulNBits" else "", **attrs)


def build(nodes, inits, x_shape, opset=17):
    """A checked model x -> y (y of x's rank, its dims left to inference); `inits` as {name: array}."""
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TP.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [f"d{i}" for i in range(len(x_shape))])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid("com.microsoft", 1)] * any(
        n.domain == "com.microsoft" for n in nodes)
    model = helper.make_model(graph, opset_imports=ops, ir_version=10 if opset >= 21 else 8)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, x, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, saved=None):
    """onnxruntime's output. Its DQ -> MatMul to MatMulNBits fusion quantizes activations to int8
    by default (accuracy level 4): level 0 keeps them float, so only the weight is compared."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if saved:
        opts.optimized_model_filepath = str(saved)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def layer(g):
    return next(n for n in g.nodes if W.is_layer(n))


def twin(model, value):
    """The same model with the layer's weight a plain fp32 initializer holding `value`."""
    g = G.to_graph(model)
    n = layer(g)
    const = gs.Constant("twin_w", np.ascontiguousarray(value, dtype=np.float32))
    if n.op == "MatMulNBits":
        x = n.inputs[0]
        n.op, n.domain, n.attrs = "MatMul", "", {}
        n.inputs.clear()
        n.inputs.extend([x, const])
    else:
        n.inputs[W.LAYERS[n.op].weight] = const
    return G.to_model(G.tidy(g), like=model)


def assert_same_outputs(a, b, x):
    ya, yb = run(a, x), run(b, x)
    assert np.abs(ya - yb).max() <= min(1e-5, 1e-6 * max(1.0, np.abs(ya).max()))


def pack(q, bits):
    """MatMulNBits packing, written independently of the library: lowest bits first."""
    q = q.astype(np.uint8)
    return q if bits == 8 else q[..., 0::2] | (q[..., 1::2] << 4)


# -- one small model per storage kind: case(rng) -> (model, kind, expected storage attributes) --

CONV_X, MM_X = [2, 3, 5, 5], [3, 8]
I8 = lambda r, *s: r.integers(-100, 101, s).astype(np.int8)


def nbits_model(r, bits, K=40, N=6, bs=16):
    blocks = -(-K // bs)
    q = r.integers(0, 1 << bits, (N, blocks, bs))
    zp = r.integers(0, 1 << bits, (N, blocks + (blocks % 2 if bits == 4 else 0)))
    inits = {"B": pack(q, bits), "scales": r.uniform(0.01, 0.05, N * blocks).astype(np.float32),
             "zp": pack(zp, bits).reshape(-1)}
    return build([node("MatMulNBits", ["x", "B", "scales", "zp"], K=K, N=N, bits=bits, block_size=bs)], inits, [3, K])


CASES = {
    "dense_initializer": lambda r: (build([node("Conv", ["x", "w"], pads=[1] * 4)], {"w": rand(4, 3, 3, 3, scale=.3)},
                                        CONV_X), "dense", {}),
    "dense_constant_node": lambda r: (build([node("Constant", [], "w", value=numpy_helper.from_array(rand(6, 8), "v")),
                                           node("Gemm", ["x", "w"], transB=1)], {}, MM_X), "dense", {}),
    "dense_transpose_chain": lambda r: (build([node("Transpose", ["wt"], "w", perm=[1, 0]), node("MatMul", ["x", "w"])],
                                            {"wt": rand(6, 8)}, MM_X), "dense", {"chain": ["Transpose"]}),
    "float16_cast": lambda r: (build([node("Cast", ["w16"], "w", to=TP.FLOAT), node("MatMul", ["x", "w"])],
                                   {"w16": rand(8, 6).astype(np.float16)}, MM_X), "dense", {"chain": ["Cast"]}),
    "qdq_int8_per_channel_conv": lambda r: (build(
        [node("DequantizeLinear", ["q", "s", "z"], "w", axis=0), node("Conv", ["x", "w"], pads=[1] * 4)],
        {"q": I8(r, 4, 3, 3, 3), "s": r.uniform(2e-3, 5e-3, 4).astype(np.float32), "z": np.int8([0, 2, -3, 1])},
        CONV_X), "qdq", {"axis": 0, "elem_type": TP.INT8}),
    "qdq_uint8_per_tensor_gemm": lambda r: (build(
        [node("DequantizeLinear", ["q", "s", "z"], "w"), node("Gemm", ["x", "w"], transB=1)],
        {"q": r.integers(0, 256, (6, 8)).astype(np.uint8), "s": np.float32(0.004), "z": np.uint8(100)},
        MM_X), "qdq", {"axis": None, "elem_type": TP.UINT8}),
    "qdq_int4_blocked_matmul": lambda r: (build(
        [node("DequantizeLinear", ["q", "s"], "w", axis=0, block_size=4), node("MatMul", ["x", "w"])],
        {"q": r.integers(-8, 8, (16, 6)).astype(ml_dtypes.int4), "s": r.uniform(0.01, 0.1, (4, 6)).astype(np.float32)},
        [3, 16], opset=21), "qdq", {"axis": 0, "block_size": 4, "elem_type": TP.INT4}),
    "qdq_fake_quant": lambda r: (build(
        [node("QuantizeLinear", ["f", "s", "z"], "q", axis=1), node("DequantizeLinear", ["q", "s", "z"], "w", axis=1),
         node("MatMul", ["x", "w"])],
        {"f": rand(8, 6, scale=.3), "s": r.uniform(2e-3, 5e-3, 6).astype(np.float32), "z": np.zeros(6, np.int8)},
        MM_X), "qdq", {"axis": 1, "elem_type": TP.INT8}),
    "codebook_gather_conv": lambda r: (build(
        [node("Cast", ["i"], "i64", to=TP.INT64), node("Gather", ["book", "i64"], "w"),
         node("Conv", ["x", "w"], pads=[1] * 4)],
        {"book": np.sort(rand(16, scale=.3)), "i": r.integers(0, 16, (4, 3, 3, 3)).astype(np.uint8)},
        CONV_X), "codebook", {"axis": None}),
    "codebook_per_channel_transpose": lambda r: (build(
        [node("Cast", ["i"], "i64", to=TP.INT64), node("GatherElements", ["book", "i64"], "rows", axis=1),
         node("Transpose", ["rows"], "w", perm=[1, 0]), node("MatMul", ["x", "w"])],
        {"book": rand(6, 4), "i": r.integers(0, 4, (6, 8)).astype(np.uint8)}, MM_X), "codebook",
        {"axis": 1, "chain": ["Transpose"]}),
    "nbits4_zero_points": lambda r: (nbits_model(r, 4), "nbits", {"bits": 4, "block_size": 16, "has_zero_point": True}),
    "nbits8_zero_points": lambda r: (nbits_model(r, 8), "nbits", {"bits": 8, "block_size": 16, "has_zero_point": True}),
}


def make(case):
    return CASES[case](np.random.default_rng(0))


def read(model):
    g = G.to_graph(model)
    n = layer(g)
    return g, n, W.layer_weight(n)


def x_for(model):
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return rand(*dims, seed=7)


@pytest.mark.parametrize("case", CASES)
def test_read_is_what_onnxruntime_computes_with(case):
    model, kind, attrs = make(case)
    _, _, st = read(model)
    assert st.kind == kind and st.value.dtype == np.float32
    assert [n.op for n in st.chain] == attrs.pop("chain", [])
    for name, want in attrs.items():
        assert getattr(st.storage, name) == want, name
    assert_same_outputs(model, twin(model, st.value), x_for(model))


def signature(model):
    """The storage as the file holds it: code types and scale shapes of every DequantizeLinear,
    codebook shapes, index types (Cast sources), MatMulNBits attributes."""
    inits = {t.name: t for t in model.graph.initializer}
    sig = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            codes = inits.get(n.input[2] if len(n.input) > 2 else n.input[0])
            sig.append((n.op_type, codes.data_type, tuple(inits[n.input[1]].dims)))
        elif n.op_type in ("Gather", "GatherElements"):
            sig.append((n.op_type, tuple(inits[n.input[0]].dims)))
        elif n.op_type == "Cast" and n.input[0] in inits:
            sig.append((n.op_type, inits[n.input[0]].data_type))
        elif n.op_type == "MatMulNBits":
            sig.append((n.op_type, tuple(sorted((a.name, a.i) for a in n.attribute))))
    return sorted(sig)


@pytest.mark.parametrize("case", CASES)
def test_write_keeps_the_storage(case):
    model, kind, _ = make(case)
    g, n, st = read(model)
    new = (st.value * 1.1 + rand(*st.value.shape, seed=3, scale=.02)).astype(np.float32)
    new.flat[:5] = 0.0
    st2 = W.write(g, n, W.LAYERS[n.op].weight, st, new)
    out = G.to_model(G.tidy(g), like=model)
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(out, twin(out, st2.value), x_for(model))
    _, _, back = read(out)
    assert back.kind == kind
    np.testing.assert_array_equal(back.value, st2.value)
    assert np.all(st2.value.flat[:5] == 0)
    if kind == "dense":
        np.testing.assert_array_equal(st2.value, new.astype(st.storage.value.dtype))
    elif kind in ("qdq", "nbits"):   # refit scales: within half a step of the value asked
        assert np.all(np.abs(st2.value - new) <= st2.storage.scale / 2 * (1 + 1e-5))
    else:
        k, v = st.storage.k, back.value
        per = [v] if st.storage.axis is None else np.moveaxis(v, st.storage.axis, 0)
        assert max(len(np.unique(c)) for c in per) <= k
    assert signature(out) == signature(model)


def shapes(model):
    return sorted(tuple(t.dims) for t in model.graph.initializer)


TAKES = [  # case, indexer, initializer shapes after, exact (whole channels/blocks kept)
    ("qdq_int8_per_channel_conv", lambda a: a[[0, 2, 3]], [(3,), (3,), (3, 3, 3, 3)], True),
    pytest.param("qdq_uint8_per_tensor_gemm", lambda a: a[[1, 4]], [(), (), (2, 8)], True),
    ("qdq_int4_blocked_matmul", lambda a: a[[0, 1, 2, 3, 8, 9, 10, 11]][:, [0, 2, 5]], [(2, 3), (8, 3)], True),
    ("qdq_int4_blocked_matmul", lambda a: a[1:7], [(2, 6), (6, 6)], False),
    ("codebook_per_channel_transpose", lambda a: a[:, [0, 3, 5]], [(2,), (3, 4), (3, 8)], True),
    ("nbits4_zero_points", lambda a: a[:, [0, 3, 4]], [(3, 3, 8), (6,), (9,)], True),
]


@pytest.mark.parametrize("case,indexer,want_shapes,exact", TAKES)
def test_take_slices_every_piece(case, indexer, want_shapes, exact):
    model, kind, _ = make(case)
    g, n, st = read(model)
    st2 = W.take(g, n, W.LAYERS[n.op].weight, st, indexer)
    out = G.to_model(G.tidy(g), like=model)
    _, _, back = read(out)
    assert back.kind == kind
    np.testing.assert_array_equal(back.value, st2.value)
    if exact:
        np.testing.assert_array_equal(back.value, indexer(st.value))
    else:   # cut through blocks: refit, still blocked, within half a step
        assert back.storage.block_size == st.storage.block_size
        assert np.all(np.abs(back.value - indexer(st.value)) <= back.storage.scale / 2 * (1 + 1e-5))
    if kind == "nbits":
        attrs = {a.name: a.i for a in out.graph.node[0].attribute}
        assert (attrs["K"], attrs["N"]) == (40, 3)
    assert shapes(out) == want_shapes


def test_storage_summary_bytes_bits_and_zeros():
    r = np.random.default_rng(2)
    q = r.integers(0, 256, (16, 8)).astype(np.uint8)
    q[q == 128] = 129
    q.flat[:10], q.flat[10:15] = 128, 0     # zero point 128: ten exact zeros; code 0 is not zero
    idx = r.integers(0, 16, (8, 4)).astype(np.uint8)
    model = build([node("DequantizeLinear", ["q", "s", "z"], "w1"), node("MatMul", ["x", "w1"], "h"),
                   node("Cast", ["i"], "i64", to=TP.INT64), node("Gather", ["book", "i64"], "w2"),
                   node("MatMul", ["h", "w2"])],
                  {"q": q, "s": np.float32(0.01), "z": np.uint8(128), "i": idx,
                   "book": np.linspace(0.1, 1.6, 16, dtype=np.float32)}, [2, 16])
    summary = W.storage_summary(G.to_graph(model))
    assert summary.weights == 128 + 32 and summary.zeros == 10
    assert summary.bytes_by_kind == {"qdq": 128 + 4 + 1, "codebook": 32 + 16 * 4}
    assert summary.bits_per_weight == pytest.approx(8 * (133 + 96) / 160)
    assert 8 < 8 * summary.bytes_by_kind["qdq"] / 128 < 8.5     # the 8-bit layer: 8 bits plus its scale
    assert summary.sparsity == pytest.approx(10 / 160)


def qdq_conv_with_int32_bias(per_tensor_bias=False):
    """x -> Q/DQ(sx) -> Conv(DQ int8 per-channel weight, DQ int32 bias at sx * sw) -> Q/DQ(sy) -> y;
    `per_tensor_bias`: every weight scale equal and the bias scale one scalar."""
    r = np.random.default_rng(1)
    sw = np.full(4, 4e-3, np.float32) if per_tensor_bias else r.uniform(2e-3, 5e-3, 4).astype(np.float32)
    sx, sy, b = np.float32(0.02), np.float32(0.05), rand(4, seed=5, scale=2.0)
    nodes = [node("QuantizeLinear", ["x", "sx", "zx"], "xq"), node("DequantizeLinear", ["xq", "sx", "zx"], "xd"),
             node("DequantizeLinear", ["qw", "sw", "zw"], "wd", axis=0),
             node("DequantizeLinear", ["qb", "sb"], "bd", **({} if per_tensor_bias else {"axis": 0})),
             node("Conv", ["xd", "wd", "bd"], "c", pads=[1] * 4),
             node("QuantizeLinear", ["c", "sy", "zx"], "cq"), node("DequantizeLinear", ["cq", "sy", "zx"])]
    inits = {"sx": sx, "zx": np.int8(0), "qw": I8(r, 4, 3, 3, 3), "sw": sw, "zw": np.zeros(4, np.int8),
             "qb": np.round(b / (sx * sw)).astype(np.int32), "sb": sx * sw[:1 if per_tensor_bias else 4], "sy": sy}
    return build(nodes, inits, CONV_X), float(sx), float(sy)


def fused_vs_reference(write_bias, tmp_path):
    """New weight rows (codes reach 127: new scales), a new bias through `write_bias`; returns the
    models, sx, sy, the fused-vs-unfused output difference and the ops onnxruntime ran."""
    model, sx, sy = qdq_conv_with_int32_bias()
    g = G.to_graph(model)
    conv = next(n for n in g.nodes if n.op == "Conv")
    W.write_rows(g, conv, W.rows_of(conv, W.layer_weight(conv)) * 2.0)
    write_bias(g, conv, rand(4, seed=6, scale=2.0))
    out = G.to_model(G.tidy(g), like=model)
    onnx.checker.check_model(out, full_check=True)
    x, saved = rand(*CONV_X, seed=8), tmp_path / "optimized.onnx"
    diff = np.abs(run(out, x, saved=saved) - run(out, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)).max()
    return model, out, sx, sy, diff, [n.op_type for n in onnx.load(str(saved)).graph.node]


def test_int32_bias_follows_input_times_weight_scales(tmp_path):
    model, out, sx, sy, diff, ops = fused_vs_reference(W.write_bias, tmp_path)
    inits = {t.name: numpy_helper.to_array(t) for t in [*model.graph.initializer, *out.graph.initializer]}
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    dq = {o: n for n in out.graph.node for o in n.output}
    w_scale, b_scale = inits[dq[conv.input[1]].input[1]], inits[dq[conv.input[2]].input[1]]
    assert not np.allclose(w_scale, inits["sw"])              # the weight scales did change
    assert inits[dq[conv.input[2]].input[0]].dtype == np.int32
    np.testing.assert_allclose(b_scale, np.float32(sx) * w_scale, rtol=2e-7)
    assert "QLinearConv" in ops                                # the integer kernel ran ...
    assert diff <= sy * 1.001                                  # ... and agrees within one output step


def test_int32_bias_at_stale_scales_is_caught(tmp_path):
    """The control: a bias left at the old scales either loses the integer kernel (onnxruntime 1.32
    checks the bias scale and falls back to float kernels) or changes its output; the test above
    catches both."""
    stale = lambda g, conv, v: W.write(g, conv, 2, W.layer_bias(conv), v)
    *_, sy, diff, ops = fused_vs_reference(stale, tmp_path)
    assert "QLinearConv" not in ops or diff > 3 * sy


def test_per_tensor_int32_bias_keeps_its_value_when_weight_scales_diverge():
    model, sx, _ = qdq_conv_with_int32_bias(per_tensor_bias=True)
    g = G.to_graph(model)
    conv = next(n for n in g.nodes if n.op == "Conv")
    W.write_rows(g, conv, W.rows_of(conv, W.layer_weight(conv)) * np.float32([[1], [2], [.5], [1.5]]))
    W.write_bias(g, conv, new := np.float32([1.0, -1.0, 0.5, 2.0]))
    back = G.to_graph(G.to_model(G.tidy(g), like=model))
    bias = W.layer_bias(next(n for n in back.nodes if n.op == "Conv")).value
    np.testing.assert_allclose(bias, new, atol=sx * 0.01)      # within a step: sx * sw < sx * 0.01


def test_storages_hold_a_byte_per_weight_and_decode_unchanged():
    """Quantized codes narrow to their code type and a per-channel scale and zero point become
    broadcasts of their tables; a codebook's index narrows to the smallest unsigned type: the same
    values decoded, a slice still taken, an encode still compact."""
    from onnxcompress.storage import as_codebook, as_quantized
    v = rand(64, 32, 3, 3)
    full = as_quantized(v, TP.INT8, axis=0)
    assert full.q.dtype == np.int8 and full.scale.strides == (full.scale.itemsize, 0, 0, 0)
    assert full.zero_point.dtype == np.int64 and full.zero_point.strides[1:] == (0, 0, 0)
    wide = replace_arrays(full)
    np.testing.assert_array_equal(full.decode(), wide.decode())
    np.testing.assert_array_equal(full.take(np.arange(0, v.size, 7)).decode(), wide.take(np.arange(0, v.size, 7)).decode())
    assert full.encode(v * 0.5, refit=True).q.dtype == np.int8
    u = as_quantized(v, TP.UINT8, axis=None, symmetric=False)
    assert u.q.dtype == np.uint8 and np.abs(u.decode() - v).max() <= float(u.scale.ravel()[0])   # no uint8 wrap-around
    book = as_codebook(v, np.linspace(-1, 1, 16).astype(np.float32)[None].repeat(64, 0), axis=0)
    assert book.index.dtype == np.uint8
    np.testing.assert_array_equal(book.decode(), book.codebook[np.arange(64)[:, None, None, None], book.index.astype(np.int64)])


def replace_arrays(q):
    """The same storage with full int64 / float arrays, as before `compact`."""
    from dataclasses import replace
    return replace(q, q=q.q.astype(np.int64), scale=np.array(q.scale), zero_point=np.array(q.zero_point))
