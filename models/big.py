"""Two ~25M-parameter models with random weights and their calibration data, for measuring the
tool's own speed and memory at a realistic size (`benchmarks/speed.py` builds them in a temporary
folder; they are not committed: 100 MB each).

    python models/big.py DIR [cnn] [tfm]   # writes DIR/cnn.onnx, cnn_calib.npz, tfm.onnx, tfm_calib.npz
    python models/big.py DIR huge          # writes DIR/huge.onnx, huge.onnx.data (2.3 GB), huge_calib.npz

(a) cnn.onnx: ResNet-50-shaped (bottlenecks 3-4-6-3, widths 64..2048, Conv(no bias)+BN+ReLU,
    residual Adds, GlobalAveragePool, Flatten, Gemm 2048->1000), He-initialised; input
    "input" [N,3,64,64].  BN statistics are set from the data actually reaching each BN
    (numpy forward on 64 calibration images), with gamma/beta and slightly perturbed
    mean/var, so activations stay bounded like in a trained net.
(b) tfm.onnx: post-LN Transformer encoder, 8 layers, d_model 512, 8 heads, FFN 2048,
    LayerNormalization, Softmax, GELU written with Erf, MatMul with constant weights + Add bias;
    mean over the sequence and a Gemm 512->1000 head; input "input" [N,64,512] float.
(c) huge.onnx: a model over 2 GB for the external-data path: a stem Conv 3->1024 then 60 blocks of
    Conv 3x3 1024->1024 (no bias) + BN + ReLU on 8x8 maps, GlobalAveragePool, Flatten, Gemm
    1024->1000; 2.27 GB of float32 weights in huge.onnx.data. Written one tensor at a time straight
    into the data file, so building it holds one layer's weights, never the model. BN statistics
    are what He-initialised weights give (mean 0, variance 1, slightly perturbed). Calibration: 32
    samples of 3x8x8.
Both opset 17, symbolic batch "N".  Calibration: 256 samples each, key "input" (huge: 32).
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
rng = np.random.default_rng(0)


# ----------------------------------------------------------------------------- CNN
def conv_np(x, w, stride, pad):
    """x [N,C,H,W], w [O,C,k,k] -> [N,O,H',W'] via im2col (float32)."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (h + 2 * pad - k) // stride + 1
    wo = (wd + 2 * pad - k) // stride + 1
    if k == 1:
        cols = x[:, :, ::stride, ::stride][:, :, :ho, :wo]           # N,C,ho,wo
        out = np.einsum("oc,nchw->nohw", w[:, :, 0, 0], cols, optimize=True)
        return out.astype(np.float32)
    patches = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # N,C,H',W',k,k
    patches = patches[:, :, ::stride, ::stride][:, :, :ho, :wo]
    cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)
    out = cols @ w.reshape(o, -1).T
    return out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2).astype(np.float32)


def maxpool_np(x, k=3, s=2, p=1):
    x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    return win.max(axis=(-1, -2))


class CNNBuilder:
    def __init__(self, x_np):
        self.nodes, self.inits = [], []
        self.x = x_np          # running numpy activation for BN statistics
        self.n = 0

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def conv_bn(self, x, x_np, cin, cout, k, stride, relu, gamma_scale=1.0, tag=""):
        nm = self.name("conv" + tag)
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        pad = k // 2
        self.init(nm + ".weight", w)
        self.nodes.append(helper.make_node("Conv", [x, nm + ".weight"], [nm + "_out"], name=nm,
                                           kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[pad] * 4))
        y = conv_np(x_np, w, stride, pad)
        mean = y.mean(axis=(0, 2, 3))
        var = y.var(axis=(0, 2, 3)) + 1e-5
        # "realistic" stats: close to the data's, not exact
        mean = mean + rng.normal(0, 0.05, cout) * np.sqrt(var)
        var = var * rng.uniform(0.8, 1.25, cout)
        gamma = rng.uniform(0.5, 1.5, cout) * gamma_scale
        beta = rng.normal(0.0, 0.1, cout)
        bn = nm.replace("conv", "bn")
        for s, v in (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var)):
            self.init(f"{bn}.{s}", v)
        self.nodes.append(helper.make_node("BatchNormalization",
                                           [nm + "_out", bn + ".scale", bn + ".bias", bn + ".mean", bn + ".var"],
                                           [bn + "_out"], name=bn, epsilon=1e-5))
        z = ((y - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
             * gamma[None, :, None, None] + beta[None, :, None, None]).astype(np.float32)
        out = bn + "_out"
        if relu:
            r = self.name("relu")
            self.nodes.append(helper.make_node("Relu", [out], [r + "_out"], name=r))
            out, z = r + "_out", np.maximum(z, 0)
        return out, z


def make_cnn(calib):
    b = CNNBuilder(None)
    xs = calib[:64]
    x, xn = b.conv_bn("input", xs, 3, 64, 7, 2, True, tag="stem")
    b.nodes.append(helper.make_node("MaxPool", [x], ["pool0_out"], name="pool0", kernel_shape=[3, 3],
                                    strides=[2, 2], pads=[1, 1, 1, 1]))
    x, xn = "pool0_out", maxpool_np(xn)
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        cout = width * 4
        for i in range(blocks):
            stride = 2 if (i == 0 and stage > 0) else 1
            h, hn = b.conv_bn(x, xn, cin, width, 1, 1, True)
            h, hn = b.conv_bn(h, hn, width, width, 3, stride, True)
            h, hn = b.conv_bn(h, hn, width, cout, 1, 1, False, gamma_scale=0.3)
            if i == 0:
                s, sn = b.conv_bn(x, xn, cin, cout, 1, stride, False, tag="down")
            else:
                s, sn = x, xn
            a = b.name("add")
            b.nodes.append(helper.make_node("Add", [h, s], [a + "_out"], name=a))
            r = b.name("relu")
            b.nodes.append(helper.make_node("Relu", [a + "_out"], [r + "_out"], name=r))
            x, xn = r + "_out", np.maximum(hn + sn, 0)
            cin = cout
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="gap"))
    b.nodes.append(helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1))
    wfc = (rng.standard_normal((1000, 2048)) * np.sqrt(2.0 / 2048)).astype(np.float32)
    b.init("fc.weight", wfc)
    b.init("fc.bias", np.zeros(1000))
    b.nodes.append(helper.make_node("Gemm", ["flat_out", "fc.weight", "fc.bias"], ["logits"], name="fc",
                                    transB=1))
    g = helper.make_graph(b.nodes, "resnet50ish",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
                          b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="make.py")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def smooth_images(n):
    """Image-like random inputs: low-frequency noise plus a little pixel noise, ~unit variance."""
    lo = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    up = np.kron(lo, np.ones((1, 1, 8, 8), np.float32))
    # cheap blur
    for ax in (2, 3):
        up = (up + np.roll(up, 1, ax) + np.roll(up, -1, ax) + np.roll(up, 2, ax) + np.roll(up, -2, ax)) / 5
    up = up / up.std()
    return (up + 0.3 * rng.standard_normal(up.shape)).astype(np.float32)


# ----------------------------------------------------------------------------- Transformer
def make_tfm(layers=8, d=512, heads=8, ffn=2048, seq=64, classes=1000):
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def lin(x, name, din, dout):
        w = init(name + ".weight", (rng.standard_normal((din, dout)) / np.sqrt(din)).astype(np.float32))
        bb = init(name + ".bias", (rng.normal(0, 0.02, dout)).astype(np.float32))
        nodes.append(helper.make_node("MatMul", [x, w], [name + "_mm"], name=name))
        nodes.append(helper.make_node("Add", [name + "_mm", bb], [name + "_out"], name=name + "_add"))
        return name + "_out"

    def ln(x, name):
        g = init(name + ".weight", rng.uniform(0.8, 1.2, d).astype(np.float32))
        bb = init(name + ".bias", rng.normal(0, 0.02, d).astype(np.float32))
        nodes.append(helper.make_node("LayerNormalization", [x, g, bb], [name + "_out"], name=name,
                                      axis=-1, epsilon=1e-5))
        return name + "_out"

    dh = d // heads
    init("shape_split", np.array([0, seq, heads, dh], np.int64))
    init("shape_merge", np.array([0, seq, d], np.int64))
    init("scale", np.array(1.0 / np.sqrt(dh), np.float32))
    init("half", np.array(0.5, np.float32))
    init("one", np.array(1.0, np.float32))
    init("inv_sqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    x = "input"
    for l in range(layers):
        p = f"l{l}."
        qkv = {}
        for t in "qkv":
            y = lin(x, p + t, d, d)
            nodes.append(helper.make_node("Reshape", [y, "shape_split"], [p + t + "_r"], name=p + t + "_reshape"))
            perm = [0, 2, 3, 1] if t == "k" else [0, 2, 1, 3]
            nodes.append(helper.make_node("Transpose", [p + t + "_r"], [p + t + "_t"], name=p + t + "_transpose",
                                          perm=perm))
            qkv[t] = p + t + "_t"
        nodes.append(helper.make_node("MatMul", [qkv["q"], qkv["k"]], [p + "scores"], name=p + "qk"))
        nodes.append(helper.make_node("Mul", [p + "scores", "scale"], [p + "scaled"], name=p + "scale"))
        nodes.append(helper.make_node("Softmax", [p + "scaled"], [p + "probs"], name=p + "softmax", axis=-1))
        nodes.append(helper.make_node("MatMul", [p + "probs", qkv["v"]], [p + "ctx"], name=p + "pv"))
        nodes.append(helper.make_node("Transpose", [p + "ctx"], [p + "ctx_t"], name=p + "ctx_transpose",
                                      perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [p + "ctx_t", "shape_merge"], [p + "ctx_m"], name=p + "ctx_reshape"))
        o = lin(p + "ctx_m", p + "o", d, d)
        nodes.append(helper.make_node("Add", [x, o], [p + "res1"], name=p + "res1"))
        x = ln(p + "res1", p + "ln1")
        h = lin(x, p + "fc1", d, ffn)
        # GELU = 0.5 x (1 + erf(x / sqrt 2))
        nodes.append(helper.make_node("Mul", [h, "inv_sqrt2"], [p + "g_div"], name=p + "g_div"))
        nodes.append(helper.make_node("Erf", [p + "g_div"], [p + "g_erf"], name=p + "g_erf"))
        nodes.append(helper.make_node("Add", [p + "g_erf", "one"], [p + "g_add"], name=p + "g_add"))
        nodes.append(helper.make_node("Mul", [h, p + "g_add"], [p + "g_mul"], name=p + "g_mul"))
        nodes.append(helper.make_node("Mul", [p + "g_mul", "half"], [p + "gelu"], name=p + "g_half"))
        f = lin(p + "gelu", p + "fc2", ffn, d)
        nodes.append(helper.make_node("Add", [x, f], [p + "res2"], name=p + "res2"))
        x = ln(p + "res2", p + "ln2")
    nodes.append(helper.make_node("ReduceMean", [x], ["pooled"], name="pool", axes=[1], keepdims=0))
    init("head.weight", (rng.standard_normal((classes, d)) / np.sqrt(d) * 3).astype(np.float32))
    init("head.bias", np.zeros(classes, np.float32))
    nodes.append(helper.make_node("Gemm", ["pooled", "head.weight", "head.bias"], ["logits"], name="head",
                                  transB=1))
    g = helper.make_graph(nodes, "encoder",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", seq, d])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="make.py")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


# ----------------------------------------------------------------------------- > 2 GB CNN
class ExternalWriter:
    """Initializers written straight into one external data file (aligned to 4 KiB, as onnx and
    onnxruntime's memory mapping like), so only the tensor being written is ever in memory."""

    def __init__(self, folder: str, location: str):
        self.location = location
        self.f = open(os.path.join(folder, location), "wb")
        self.inits: list[onnx.TensorProto] = []

    def add(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr, np.float32)
        offset = -(-self.f.tell() // 4096) * 4096
        self.f.seek(offset)
        self.f.write(arr.tobytes())   # one tensor's bytes at a time
        t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape,
                             data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        self.inits.append(t)
        return name

    def close(self) -> None:
        self.f.close()


def make_huge(folder: str, blocks: int = 60, width: int = 1024, classes: int = 1000) -> onnx.ModelProto:
    """(c): saved as folder/huge.onnx with its weights in folder/huge.onnx.data."""
    w = ExternalWriter(folder, "huge.onnx.data")
    nodes, x, cin = [], "input", 3
    for i in range(blocks + 1):
        p = f"b{i}."
        w.add(p + "conv.weight", rng.standard_normal((width, cin, 3, 3), dtype=np.float32)
              * np.float32(np.sqrt(2.0 / (cin * 9))))
        bn = {"scale": rng.uniform(0.8, 1.2, width), "bias": rng.normal(0, 0.1, width),
              "mean": rng.normal(0, 0.05, width), "var": rng.uniform(0.8, 1.25, width)}
        for k, v in bn.items():
            w.add(p + "bn." + k, v)
        nodes += [helper.make_node("Conv", [x, p + "conv.weight"], [p + "conv_out"], name=p + "conv",
                                   kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [p + "conv_out"] + [p + "bn." + k for k in bn],
                                   [p + "bn_out"], name=p + "bn", epsilon=1e-5),
                  helper.make_node("Relu", [p + "bn_out"], [p + "relu_out"], name=p + "relu")]
        x, cin = p + "relu_out", width
    w.add("fc.weight", rng.standard_normal((classes, width), dtype=np.float32) * np.float32(np.sqrt(2.0 / width)))
    w.add("fc.bias", np.zeros(classes))
    w.close()
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="gap"),
              helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten", axis=1),
              helper.make_node("Gemm", ["flat_out", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "huge",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], w.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="make.py")
    m.ir_version = 8
    path = os.path.join(folder, "huge.onnx")
    onnx.save(m, path)
    onnx.checker.check_model(path)
    return m


def nparams(m):
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == TensorProto.FLOAT)


def main(out: str, which: list[str]) -> None:
    HERE = out
    if "cnn" in which:
        calib = smooth_images(256)
        m = make_cnn(calib)
        onnx.save(m, os.path.join(HERE, "cnn.onnx"))
        np.savez(os.path.join(HERE, "cnn_calib.npz"), input=calib)
        print("cnn", nparams(m), "params", os.path.getsize(os.path.join(HERE, "cnn.onnx")), "bytes")
    if "tfm" in which:
        m = make_tfm()
        onnx.save(m, os.path.join(HERE, "tfm.onnx"))
        calib = rng.standard_normal((256, 64, 512)).astype(np.float32)
        np.savez(os.path.join(HERE, "tfm_calib.npz"), input=calib)
        print("tfm", nparams(m), "params", os.path.getsize(os.path.join(HERE, "tfm.onnx")), "bytes")
    if "huge" in which:
        m = make_huge(HERE)
        np.savez(os.path.join(HERE, "huge_calib.npz"), input=smooth_images(32)[:, :, ::8, ::8])
        print("huge", nparams(m), "params", os.path.getsize(os.path.join(HERE, "huge.onnx.data")), "bytes of data")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["cnn", "tfm"])
