"""The benchmark suite's own plumbing (the measurements themselves live in benchmarks/)."""
from benchmarks.ocr import replace_section
from benchmarks.run import keep_ocr_part

TEXT = """# Benchmarks

## Pruning

old MNIST rows

PP-OCR here:

| rec | 77% |

## Next

kept
"""


def test_a_section_rerun_without_pp_ocr_keeps_its_old_pp_ocr_part():
    """`--only prune --skip-ocr`: the new MNIST part, then the old PP-OCR part up to the next section."""
    section = keep_ocr_part("## Pruning\n\nnew MNIST rows\n", TEXT, "## Pruning", "PP-OCR here:")
    assert section == "## Pruning\n\nnew MNIST rows\n\nPP-OCR here:\n\n| rec | 77% |\n"
    assert replace_section(TEXT, section, "## Pruning") == TEXT.replace("old MNIST", "new MNIST")
    assert keep_ocr_part("## Other\n\nrows\n", TEXT, "## Other", "PP-OCR here:") == "## Other\n\nrows\n"


def test_each_model_is_timed_against_the_original_in_its_own_pairs_round_by_round(monkeypatch):
    """`median_latency`: per round, one run-by-run pair per model with the original (scripted
    timings); the original's latency is the median over all its pairs, each other model's ratio
    the median of its rounds' ratios, so a burst that slows one round of one pair is dropped."""
    import benchmarks.run as R
    pairs = []
    times = iter([({1: 10.0}, {1: 5.0}), ({1: 12.0}, {1: 3.0}),      # round 1: a 0.5, b 0.25
                  ({1: 10.0}, {1: 9.0}), ({1: 12.0}, {1: 3.6}),      # round 2: a 0.9 (a burst), b 0.3
                  ({1: 11.0}, {1: 5.5}), ({1: 14.0}, {1: 2.8})])     # round 3: a 0.5, b 0.2
    monkeypatch.setattr(R, "interleaved_latency_ms",
                        lambda models, *a, rounds: pairs.append((models, rounds)) or next(times))
    out = R.median_latency(["orig", "a", "b"], None, None, 3)
    assert pairs == [(["orig", "a"], 1), (["orig", "b"], 1)] * 3
    assert out == [{1: 11.5}, {1: 5.75}, {1: 11.5 * 0.25}]


def test_the_profile_counts_every_layers_macs_from_the_shapes_onnxruntime_ran(calib):
    """The per-layer bound scales each profiled node by its own MACs: over the nodes onnxruntime
    ran (convs fused with their activations, Gemms with theirs), they add up to the model's."""
    import onnx

    from benchmarks.prune import _profiles
    from benchmarks.run import ROOT
    from onnxcompress.metrics import total_macs
    for name in ("resnet", "vgg", "mobilenet", "mlp"):
        model = onnx.load(str(ROOT / "models" / f"{name}.onnx"))
        (_, _, nodes), (_, _, again) = _profiles([model, model], calib, batch=2)
        assert sum(macs for _, macs in nodes.values()) == 2 * total_macs(model), name
        assert {n: macs for n, (_, macs) in nodes.items()} == {n: macs for n, (_, macs) in again.items()}


def test_the_per_layer_bound_scales_each_layer_by_its_own_macs():
    """A layer with half its MACs left counts half its original time; layers without MACs, and
    nodes only the cut runs, count as the cut measured them; a node the cut no longer runs, nothing."""
    from benchmarks.prune import _scaled_kernels
    original = {"conv": (100.0, 10), "pool": (50.0, 0), "gone": (7.0, 0)}
    cut = {"conv": (60.0, 5), "pool": (40.0, 0), "reorder": (3.0, 0)}
    assert _scaled_kernels(original, cut) == 100.0 * 5 / 10 + 40.0 + 3.0
