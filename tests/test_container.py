"""The entropy coder and the container: bit-identical round trips, sizes near the entropy bound,
and corrupt containers refused with one line."""
import glob
import struct
import zlib

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import helper, numpy_helper

from conftest import MODELS, apply_pass, make_model, rand, run, tensor
from onnxcompress import cli, container, entropy
from onnxcompress.container import ContainerError
from onnxcompress.passes import ClusterWeights, PruneWeights

REFERENCE = sorted(glob.glob(str(MODELS / "*.onnx")))


@pytest.mark.parametrize("symbols", [np.zeros(0, int), np.array([5]), np.full(3000, 2), np.arange(256).repeat(7),
                                     np.where(np.arange(100000) % 997 == 0, 3, 0)])
def test_entropy_round_trip_edge_cases(symbols):
    np.testing.assert_array_equal(entropy.decode(entropy.encode(symbols)), symbols)


def test_canonical_codes_are_prefix_free_and_length_limited():
    counts = (2.0 ** np.arange(30)).astype(np.int64)         # a Fibonacci-like skew wants 29-bit codes
    lengths = entropy.code_lengths(counts, limit=15)
    assert lengths.max() <= 15 and np.sum(2.0 ** -lengths) <= 1.0     # Kraft: a prefix code exists
    code = entropy.Huffman(lengths)
    words = {format(int(c), f"0{int(n)}b") for c, n in zip(code.codes(), lengths)}
    assert not any(a != b and b.startswith(a) for a in words for b in words)


@pytest.mark.parametrize("k", [4, 16, 256])
@pytest.mark.parametrize("p0", [0.3, 0.8, 0.97])
def test_coded_size_is_within_3_percent_of_the_entropy(p0, k):
    rng = np.random.default_rng(0)
    symbols = rng.choice(k, 400_000, p=np.r_[p0, np.full(k - 1, (1 - p0) / (k - 1))])
    data = entropy.encode(symbols)
    np.testing.assert_array_equal(entropy.decode(data), symbols)
    assert len(data) <= 1.03 * entropy.entropy_bits(symbols) / 8


@given(st.lists(st.integers(1, 2000), min_size=2, max_size=40), st.integers(1, 30_000), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=60, deadline=None)
def test_rans_round_trips_any_distribution_and_length(counts, n, seed):
    rng = np.random.default_rng(seed)
    p = np.asarray(counts, float)
    symbols = rng.choice(len(counts), n, p=p / p.sum())
    freqs = entropy.rans_freqs(np.bincount(symbols, minlength=len(counts)))
    assert freqs.sum() == 2 ** entropy.SCALE_BITS and np.all((freqs > 0) == (np.bincount(symbols, minlength=len(counts)) > 0))
    states, words = entropy.rans_encode(symbols, freqs)
    np.testing.assert_array_equal(entropy.rans_decode(states, words, freqs, n), symbols)


def test_rans_beats_huffman_where_one_symbol_is_likely():
    """A 2-bit stream with p(0) = 0.9: Huffman spends at least a bit per symbol, rANS ~0.57."""
    symbols = np.random.default_rng(1).choice(4, 200_000, p=[0.9, 0.04, 0.03, 0.03])
    data = entropy.encode(symbols)
    assert entropy.describe(data) == {"rans": 200_000}
    assert len(data) <= 1.01 * entropy.entropy_bits(symbols) / 8


@pytest.mark.parametrize("how", ["truncate", "flip", "huge"])
def test_malformed_streams_raise_value_error(how):
    data = entropy.encode(np.random.default_rng(2).choice(4, 50_000, p=[0.7, 0.1, 0.1, 0.1]))
    if how == "truncate":
        data = data[:-7]
    elif how == "flip":
        data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x5A]) + data[len(data) // 2 + 1:]
    else:
        data = bytes([0]) + b"\xff" * 8 + b"\x01" + data[2:]
    with pytest.raises(ValueError):
        entropy.decode(data, limit=50_000)


def variants(path: str):
    model = onnx.load(path)
    pruned, _ = apply_pass(PruneWeights(sparsity=0.8), model)
    yield model
    yield pruned                                                   # sparse float tensors
    yield apply_pass(ClusterWeights(bits=4), pruned)[0]            # uint8 indices, zero-dominated


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: p.rsplit("/", 1)[-1])
def test_pack_unpack_is_bit_identical_on_the_reference_models(path):
    for model in variants(path):
        blob, stats = container.pack(model)
        assert container.unpack(blob).SerializeToString() == model.SerializeToString()
        assert stats.bytes == len(blob) and stats.coded_bytes <= 1.03 * stats.entropy_bytes + 64 * stats.tensors["entropy"]


@st.composite
def random_models(draw):
    """Graphs of Add nodes over initializers of random types, sizes and sparsity."""
    seed = draw(st.integers(0, 10_000))
    rng = np.random.default_rng(seed)
    kinds = [np.float32, np.float16, np.uint8, np.int8, np.int64]
    inits, nodes = {}, []
    for i in range(draw(st.integers(1, 5))):
        dtype = kinds[draw(st.integers(0, len(kinds) - 1))]
        n = draw(st.sampled_from([1, 7, 300, 5000]))
        if np.issubdtype(dtype, np.floating):
            a = rng.normal(size=n).astype(dtype) * (rng.random(n) < draw(st.sampled_from([0.05, 0.5, 1.0])))
        else:
            a = rng.integers(0, draw(st.sampled_from([2, 16, 100])), size=n).astype(dtype)
        inits[f"t{i}"] = a
        nodes.append(helper.make_node("Identity", [f"t{i}"], [f"o{i}"]))
    outputs = [helper.make_tensor_value_info(f"o{i}", numpy_helper.from_array(a).data_type, list(a.shape))
               for i, a in enumerate(inits.values())]
    graph = helper.make_graph(nodes, "random", [], outputs, [numpy_helper.from_array(a, k) for k, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_models())
def test_pack_unpack_is_bit_identical_on_random_graphs(model):
    assert container.unpack(container.pack(model)[0]).SerializeToString() == model.SerializeToString()


def test_packed_4_bit_indices_round_trip():
    from onnxcompress import LatencyConfig, PassManager
    model = PassManager([ClusterWeights(bits=4, packed=True)], latency=LatencyConfig(enabled=False)).run(
        onnx.load(REFERENCE[0])).model
    assert container.unpack(container.pack(model)[0]).SerializeToString() == model.SerializeToString()


@pytest.fixture(scope="module")
def blob():
    return container.pack(apply_pass(ClusterWeights(bits=4), onnx.load(str(MODELS / "resnet.onnx")))[0])[0]


def corrupt(blob: bytes, how: str) -> bytes:
    length = struct.unpack_from("<I", blob, 12)[0]
    if how == "magic":
        return b"NOTONNX!" + blob[8:]
    if how == "version":
        return blob[:8] + struct.pack("<H", 9) + blob[10:]
    if how == "truncated":
        return blob[:-100]
    if how == "header-size":
        return blob[:12] + struct.pack("<I", length + 10 ** 9) + blob[16:]
    if how == "manifest":
        return blob[:30] + bytes([blob[30] ^ 0xFF]) + blob[31:]
    if how == "manifest-zlib":          # a manifest that is not zlib data, with a matching checksum
        return blob[:12] + struct.pack("<II", 4, zlib.crc32(b"junk")) + b"junk" + blob[20 + length:]
    if how == "section":
        return blob[:-50] + bytes([blob[-50] ^ 0x01]) + blob[-49:]
    if how == "short":
        return blob[:10]
    raise AssertionError(how)


@pytest.mark.parametrize("how, message", [
    ("magic", "wrong magic"), ("version", "version 9 is not supported"), ("truncated", "truncated or padded"),
    ("header-size", "truncated container"), ("manifest", "manifest's checksum"), ("section", "fails its checksum"),
    ("short", "shorter than the header"), ("manifest-zlib", "unreadable manifest")])
def test_corrupt_containers_are_refused(blob, how, message):
    with pytest.raises(ContainerError, match=message):
        container.unpack(corrupt(blob, how))


def test_a_manifest_announcing_a_huge_tensor_is_refused_before_decoding(blob):
    length = struct.unpack_from("<I", blob, 12)[0]
    text = zlib.compress(zlib.decompress(blob[20:20 + length]).replace(b'"bytes":', b'"bytes":9', 1))   # 9 in front of the first size
    bad = blob[:12] + struct.pack("<II", len(text), zlib.crc32(text)) + text + blob[20 + length:]
    with pytest.raises(ContainerError, match="does not match the graph|announces|expands"):
        container.unpack(bad)


def test_cli_pack_unpack_and_refusals(tmp_path, capsys, blob):
    src = MODELS / "vgg.onnx"
    assert cli.main(["pack", str(src), "-o", str(tmp_path / "v.pack")]) == 0
    assert cli.main(["unpack", str(tmp_path / "v.pack"), "-o", str(tmp_path / "v.onnx")]) == 0
    assert onnx.load(str(tmp_path / "v.onnx")).SerializeToString() == onnx.load(str(src)).SerializeToString()
    (tmp_path / "bad.pack").write_bytes(corrupt(blob, "section"))
    capsys.readouterr()
    assert cli.main(["unpack", str(tmp_path / "bad.pack"), "-o", str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxcompress: error: corrupted container") and "\n" not in err
    assert not (tmp_path / "bad.onnx").exists()


def test_a_container_loads_as_a_model_or_a_session(tmp_path, blob):
    (tmp_path / "r.pack").write_bytes(blob)
    model = container.load(tmp_path / "r.pack")
    sess = container.session(tmp_path / "r.pack")
    x = rand(4, 1, 28, 28, seed=1)
    np.testing.assert_array_equal(sess.run(None, {"input": x})[0], run(model, {"input": x})[0])
