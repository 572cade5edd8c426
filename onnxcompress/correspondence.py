"""Which teacher tensor a student tensor is, by what it is rather than what it is called.

Recovery needs the teacher's output of every layer a pass changed. Tensor names are the first
guess, but exporters, tools and passes rename tensors; so a tensor is also identified by its
*structure*: the op that computes it and, recursively, the structure of its non-constant inputs,
anchored on the graph inputs (whose names a teacher shares with its student). Weights are left out
of the signature, so compressed layers still match. Tensors with the same structure (parallel
branches alike) are paired in topological order, and only when both graphs have as many of them.
"""
from __future__ import annotations

from typing import Iterable

import onnx

__all__ = ["structural_ids", "match_tensors"]

# Ops whose presence depends on the pass, not on what the tensor is: seen through.
_TRANSPARENT = frozenset({"Identity", "Dropout", "QuantizeLinear", "DequantizeLinear"})


def structural_ids(model: onnx.ModelProto, table: dict[tuple, int]) -> dict[str, int]:
    """A structural id for every tensor a top-level node computes (and every graph input). Equal
    structures get equal ids across the models that share `table` (signatures stay shallow: an op,
    an output index and the ids of its inputs)."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    intern = lambda key: table.setdefault(key, len(table))
    ids = {i.name: intern(("input", i.name)) for i in model.graph.input if i.name not in consts}
    for node in model.graph.node:   # ONNX nodes are stored in topological order
        if node.op_type == "Constant":
            continue
        inputs = tuple(ids.get(i, -1) for i in node.input if i and i not in consts)
        if node.op_type in _TRANSPARENT and inputs and inputs[0] >= 0:
            ids.update((o, inputs[0]) for o in node.output)
            continue
        ids.update((o, intern((node.op_type, k, inputs))) for k, o in enumerate(node.output))
    return ids


def match_tensors(student: onnx.ModelProto, teacher: onnx.ModelProto) -> dict[str, str]:
    """Student tensor name -> teacher tensor name, for every tensor computed in both: by name when
    the teacher has it, else by structure (unique, or paired in order when the counts agree)."""
    table: dict[tuple, int] = {}
    s_ids, t_ids = structural_ids(student, table), structural_ids(teacher, table)
    teacher_names = set(t_ids)
    out = {name: name for name in s_ids if name in teacher_names}
    claimed = set(out.values())          # a teacher tensor matched by name is not matched again
    by_sig_s = _group((n, i) for n, i in s_ids.items() if n not in out)
    by_sig_t = _group((n, i) for n, i in t_ids.items() if n not in claimed)
    for sig, names in by_sig_s.items():
        candidates = by_sig_t.get(sig, [])
        if len(candidates) == len(names):
            out.update(zip(names, candidates))
    return out


def _group(items: Iterable[tuple[str, int]]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, sig in items:
        groups.setdefault(sig, []).append(name)
    return groups
