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
