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


def test_each_model_is_timed_against_the_original_in_its_own_pair(monkeypatch):
    """`median_latency`: one run-by-run pair per model with the original (scripted timings: the
    original reads 10 then 12 ms in the two pairs); its latency is the median over its pairs and
    each other model's keeps its pair's ratio."""
    import benchmarks.run as R
    pairs, times = [], iter([({1: 10.0}, {1: 5.0}), ({1: 12.0}, {1: 3.0})])
    monkeypatch.setattr(R, "interleaved_latency_ms", lambda models, *a, **k: pairs.append(models) or next(times))
    out = R.median_latency(["orig", "a", "b"], None, None, 3)
    assert pairs == [["orig", "a"], ["orig", "b"]]
    assert out == [{1: 11.0}, {1: 5.5}, {1: 2.75}]       # ratios 0.5 and 0.25 of the pairs
