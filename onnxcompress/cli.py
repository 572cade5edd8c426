"""The `onnxcompress` command: compress, inspect, bench, passes.

Exit codes: 0 success; 1 the accuracy budget could not be met or a pass failed; 2 bad input or
options (one-line message, nothing written).
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from . import container, graph as G, io, weights as W
from ._version import __version__
from .data import LAYOUTS, conform, load_dataset
from .errors import BudgetError, CompressError, InputError
from .manager import Evaluator, PassManager, random_dataset
from .metrics import LatencyConfig, count_params, macs_breakdown
from .pass_api import Registry, default_registry, type_name
from .pipeline import parse_pipeline, parse_recipe
from .report import Report, Step, format_table, human_bytes, human_count, render
from .runtime import channel_multiple, check_providers
from .validate import ValidationError, validate_model

log = logging.getLogger("onnxcompress")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _round_to(text: str) -> int | str:
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got '{text}'")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"ratios must be between 0 and 1, got '{text}'")
    return values


DEFAULT_MAX_DROP = 1.0


def _budget(text: str) -> float | str:
    if text.strip().lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points or 'none', got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"the budget must be at least 0 points, got '{text}'")
    return value


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onnxcompress", description="Compress trained ONNX models.")
    ap.add_argument("--version", action="version", version=f"onnxcompress {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    ap.add_argument("--debug", action="store_true", help="show tracebacks, with their causes, for errors")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="run a pipeline of passes on a model")
    c.add_argument("input", help="the .onnx model (never modified)")
    c.add_argument("-o", "--output", required=True, help="where to write the compressed model")
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument("--passes", help="pipeline, e.g. \"fold-bn,prune-weights(sparsity=0.5)\"")
    how.add_argument("--recipe", help="TOML recipe file holding a pipeline")
    c.add_argument("--calib", help="calibration data (.npz keyed by input name, or a folder)")
    c.add_argument("--eval", help="evaluation data (.npz with optional 'labels'); default: the calibration data")
    _layout_arg(c)
    c.add_argument("--max-drop", type=_budget, help="budget in points of accuracy (with labels), else of agreement "
                   "with the original as a user sees it (top-1, decoded sequences, map IoU); default 1, 'none' for no limit")
    c.add_argument("--teacher", help="comma-separated teacher models (default: the input model)")
    c.add_argument("--temperature", type=float, help="distillation temperature (default 4)")
    c.add_argument("--alpha", type=float, help="weight of hard labels in distillation (default 0)")
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--plot", help="write a PNG of the sweeps the passes measured (early-exit: accuracy drop and "
                   "share exiting against expected MACs, per threshold); needs matplotlib (pip install onnxcompress[plot])")
    c.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data beside the model")
    _runtime_args(c)

    i = sub.add_parser("inspect", help="ops, parameters and MACs per layer, and where passes apply")
    i.add_argument("input")

    b = sub.add_parser("bench", help="size, MACs, latency and accuracy of models side by side")
    b.add_argument("models", nargs="+")
    b.add_argument("--eval", help="evaluation data (.npz with optional 'labels')")
    _layout_arg(b)
    _runtime_args(b)

    s = sub.add_parser("sensitivity", help="accuracy of each channel group pruned alone; ratio allocation")
    s.add_argument("input")
    s.add_argument("--calib", required=True, help="calibration data (shapes, data criteria)")
    s.add_argument("--eval", help="evaluation data (default: the calibration data)")
    _layout_arg(s)
    s.add_argument("--ratios", type=_floats, default=(0.25, 0.5, 0.75), help="ratios to try (default 0.25,0.5,0.75)")
    s.add_argument("--criterion", help="importance criterion (see `onnxcompress passes`; default: prune-channels' own)")
    s.add_argument("--round-to", type=_round_to, default="auto",
                   help="kept channel counts are multiples of this (default auto: what the kernels want)")
    s.add_argument("--jobs", type=int, help="parallel worker processes for the trials (default: one per core)")
    target = s.add_mutually_exclusive_group()
    target.add_argument("--target-macs", type=float, help="allocate ratios to reach this fraction of the MACs")
    target.add_argument("--target-latency", type=float, help="allocate ratios to reach this fraction of the latency")
    s.add_argument("--samples", type=int, help="evaluate on the first N samples only (faster)")
    s.add_argument("--recover", action="store_true", help="measure each setting after recovery (slower, closer to the result)")
    s.add_argument("--plot", help="write a PNG plot (needs matplotlib: pip install onnxcompress[plot])")
    s.add_argument("--report", help="write the table and allocation as JSON")
    _runtime_args(s)

    k = sub.add_parser("pack", help="write a model as an entropy-coded container (see onnxcompress.container)")
    k.add_argument("input", help="the .onnx model (never modified)")
    k.add_argument("-o", "--output", required=True, help="where to write the container")
    u = sub.add_parser("unpack", help="restore the .onnx model a container holds, bit for bit")
    u.add_argument("input", help="the container")
    u.add_argument("-o", "--output", required=True, help="where to write the .onnx model")

    sub.add_parser("passes", help="list every pass with its options")
    return ap


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", type=_csv, help="execution providers, e.g. cpu or cuda,cpu (default cpu)")
    p.add_argument("--batch-sizes", type=_ints, default=(1,), help="latency batch sizes, e.g. 1,32 (default 1)")
    p.add_argument("--runs", type=int, default=30, help="latency runs per measurement; the median is reported")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads for latency")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")


def _latency(args: argparse.Namespace) -> LatencyConfig:
    if args.runs < 1:
        raise InputError("--runs must be at least 1")
    return LatencyConfig(batch_sizes=args.batch_sizes, runs=args.runs, threads=args.threads,
                         enabled=not args.no_latency)


def _load_checked(path: str, providers: Sequence[str]) -> onnx.ModelProto:
    model = io.load_model(path)
    try:
        validate_model(model, providers)
    except ValidationError as e:
        raise InputError(f"{path} is not a valid model: {e}") from e  # --debug shows the checker's own error
    return io.weights_to_scratch(model)


def cmd_compress(args: argparse.Namespace, registry: Registry) -> int:
    if args.recipe:
        recipe = parse_recipe(io.read_text(args.recipe), args.recipe)
        steps, settings = recipe.steps, recipe.settings
    else:
        steps, settings = parse_pipeline(args.passes), {}
    passes = [registry.create(name, opts) for name, opts in steps]  # option errors before any work
    pick = lambda flag, key, default: flag if flag is not None else settings.get(key, default)
    providers = check_providers(pick(args.providers, "providers", None))
    src, dst = Path(args.input), Path(args.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise InputError("the output path is the input file; onnxcompress never overwrites its input")
    if not dst.parent.exists():
        raise InputError(f"output folder does not exist: {dst.parent}")
    model = _load_checked(args.input, providers)
    names = G.input_names(model)
    calib = load_dataset(args.calib, names, args.layout) if args.calib else None
    evaluation = load_dataset(args.eval, names, args.layout) if args.eval else None
    teachers = [_load_checked(t, providers) for t in _csv(args.teacher)] if args.teacher else []
    max_drop = pick(args.max_drop, "max_drop", DEFAULT_MAX_DROP)
    manager = PassManager(passes, calib=calib, eval_data=evaluation, teachers=teachers, providers=providers,
                          max_drop=None if max_drop == "none" else max_drop, latency=_latency(args),
                          temperature=pick(args.temperature, "temperature", 4.0), alpha=pick(args.alpha, "alpha", 0.0))
    if args.plot:
        _pyplot()                                  # missing matplotlib: say so before the passes run
    result = manager.run(model, name=src.name)
    io.save_model(result.model, dst, external_data=True if args.external_data else None)
    print(render(result.report))
    if args.report:
        io.write_json(args.report, result.report.to_dict())
    print(f"wrote {dst}")
    if args.plot:
        sweeps = [s for s in result.report.steps if s.stats.get("sweep")]
        if sweeps:
            io.write_bytes(args.plot, _sweep_plot(sweeps))
            print(f"wrote {args.plot}")
        else:
            print("--plot: no pass measured a sweep; nothing plotted")
    if not result.budget_met:
        raise BudgetError(f"budget of {manager.max_drop:g} points of {result.report.budget['metric']} not met "
                          f"(--max-drop; 'none' lifts it): rolled-back passes are listed "
                          f"above; {dst} holds the passes that fit")
    return 0


def cmd_inspect(args: argparse.Namespace, registry: Registry) -> int:
    model = _load_checked(args.input, check_providers(None))
    ops = Counter(n.op_type for n in model.graph.node)
    print(f"{args.input}: opset {model.opset_import[0].version}, IR {model.ir_version}, "
          f"{len(model.graph.node)} nodes, {human_count(count_params(model))} parameters, {human_bytes(io.model_size(model))}")
    print("\nops: " + ", ".join(f"{op} x{n}" for op, n in ops.most_common()))
    graph = G.to_graph(model)
    summary = W.storage_summary(graph)
    kinds = ", ".join(f"{k} {human_bytes(b)}" for k, b in summary.bytes_by_kind.items())
    print(f"layer weights: {human_count(summary.weights)} at {summary.bits_per_weight:.1f} bits each ({kinds or 'none'}), "
          f"{summary.sparsity * 100:.1f}% zero")
    layers = {G.layer_id(n): n for n in graph.nodes if W.is_layer(n)}
    rows = []
    for d in macs_breakdown(model):
        node = layers.get(d.output)
        weight = W.layer_weight(node) if node is not None else None
        if weight is None and not d.macs:
            continue
        bias = W.layer_bias(node) if node is not None else None
        params = (weight.value.size if weight else 0) + (bias.value.size if bias else 0)
        storage = f"{weight.kind} ({8 * weight.storage.nbytes() / weight.value.size:.1f} bits)" if weight else "-"
        macs = "?" if d.macs is None else human_count(d.macs) + (" (worst branch)" if d.op == "If" else "")
        rows.append([d.name, d.op, human_count(params), storage, macs])
    print("\nper layer (MACs at batch 1):\n" + format_table(rows, ["node", "op", "params", "weight storage", "MACs"]))
    from .channels import analyze
    try:
        an = analyze(G.to_graph(model), model)
    except Exception as e:  # analysis is informative only; never fail inspect on it
        print(f"\nchannel groups: analysis failed ({type(e).__name__}: {e})")
    else:
        groups = [g for g in an.groups if g.producers]
        rows = [[g.name, str(len(g.units)), str(len(g.producers)), str(len(g.consumers)),
                 "prunable" if not g.frozen else f"frozen: {g.frozen}"] for g in groups]
        print(f"\nchannel groups ({sum(not g.frozen for g in groups)} of {len(groups)} prunable by prune-channels):\n"
              + format_table(rows, ["group", "channels", "producers", "consumers", "status"]))
    print("\npasses that apply:")
    for cls in registry:
        nodes = [n.name or n.output[0] for n in model.graph.node if n.op_type in cls.handles]
        where = ", ".join(nodes[:6]) + (f", ... ({len(nodes)} nodes)" if len(nodes) > 6 else "")
        print(f"  {cls.name}: {where if nodes else 'nothing to do'}")
    return 0


def _layout_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=LAYOUTS, help="how the data is laid out: 'batch' (axis 0 is the model's "
                        "batch axis; a folder's files are concatenated), or 'feeds' (axis 0 indexes complete feeds, "
                        "each run as it is; a folder: one feed per .npz). Default: what the data declares "
                        "('__layout__' in the .npz), else batch")


def cmd_bench(args: argparse.Namespace, registry: Registry) -> int:
    providers = check_providers(args.providers)
    models = [_load_checked(m, providers) for m in args.models]
    data = conform(load_dataset(args.eval, G.input_names(models[0]), args.layout), models[0]) if args.eval \
        else random_dataset(models[0])
    evaluator = Evaluator(models[0], data, providers, _latency(args))

    report = Report(args.models[0])
    for path, model in zip(args.models, models):
        report.steps.append(evaluator.measure(model, Step(Path(path).name, "measured")))
    print(render(report))
    return 0


def cmd_sensitivity(args: argparse.Namespace, registry: Registry) -> int:
    from .pass_api import Context
    from .channels import analyze
    from .sensitivity import allocate, pass_pruner, sensitivity, trial_ratios

    registry.create("prune-channels", {"criterion": args.criterion, "round_to": args.round_to})  # checks both
    if args.jobs is not None and args.jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {args.jobs}")
    providers = check_providers(args.providers)
    model = _load_checked(args.input, providers)
    names = G.input_names(model)
    calib = conform(load_dataset(args.calib, names, args.layout), model)
    evaluation = conform(load_dataset(args.eval, names, args.layout), model) if args.eval else calib
    if args.samples:
        evaluation = evaluation.take(args.samples)
    latency = _latency(args) if args.target_latency else None
    ctx = Context(calib=calib, original=model, teachers=[model], providers=providers)
    round_to = args.round_to if args.round_to != "auto" else channel_multiple(providers)[0]
    criterion = args.criterion or registry.create("prune-channels").criterion_for(calib)
    prune = pass_pruner(registry, ctx, criterion, round_to, args.recover)
    an = analyze(G.to_graph(model), model, calib.feed_shapes())
    groups = [g for g in an.groups if not g.frozen]
    trials = trial_ratios(an, groups, args.ratios)   # + 1 for residual branches
    sens = sensitivity(model, prune, calib, evaluation, trials, latency, providers, recovered=args.recover,
                       units={g.name: len(g.units) for g in groups}, jobs=args.jobs)
    header = ["group", "channels"] + [f"{sens.metric} @{r:g}" for r in sens.ratios] + [f"MACs @{r:g}" for r in sens.ratios]
    at = lambda g, values, show: [show(dict(zip(sens.ratios_of(g), values))[r]) if r in sens.ratios_of(g) else "-"
                                  for r in sens.ratios]
    rows = [[g, str(sens.channels[g])] + at(g, sens.score[g], lambda s: f"{s:.2f} ({s - sens.base_score:+.2f})")
            + at(g, sens.macs[g], lambda m: f"{m / sens.base_macs:.2f}x") for g in sens.groups]
    print(f"{args.input}: {sens.metric} {sens.base_score:.2f} unpruned; each group pruned alone, "
          f"{'with' if args.recover else 'no'} recovery")
    print(format_table(rows, header))
    report = {"sensitivity": sens.to_dict()}
    if args.target_macs or args.target_latency:
        by = "latency" if args.target_latency else "macs"
        target = args.target_latency or args.target_macs
        structure = pass_pruner(registry, ctx, criterion, round_to, recover=False)  # MACs and latency alike
        ratios, measured = allocate(model, structure, sens, calib, target, by, latency, providers)
        spec = f"prune-channels(ratios={ {k: v for k, v in ratios.items()} }, criterion='{criterion}', round_to={round_to})"
        print(f"\nallocation for {by} <= {target:g}x: {'met' if measured['target_met'] else 'NOT met'}; "
              f"MACs {measured['macs'] / sens.base_macs:.2f}x" +
              (f", latency {measured['latency_ms'] / sens.base_latency:.2f}x" if by == "latency" else ""))
        print(f"pipeline: {spec}")
        report["allocation"] = {"ratios": ratios, "measured": measured, "pipeline": spec}
    if args.report:
        io.write_json(args.report, report)
    if args.plot:
        io.write_bytes(args.plot, _plot(sens))
    return 0


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib (pip install onnxcompress[plot])") from None
    return plt


def _png(fig) -> bytes:
    import io as _bytes_io
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _sweep_plot(steps) -> bytes:
    """Each sweep (one per step that measured one): the drop and the share exiting against the
    expected MACs, one point per threshold (for several exits, per setting of their thresholds on
    the chosen chain's Pareto front, written t1/t2), the chosen one marked."""
    plt = _pyplot()
    text = lambda t: "/".join(f"{v:g}" for v in np.atleast_1d(t))
    fig, axes = plt.subplots(1, len(steps), figsize=(7 * len(steps), 4.5), squeeze=False)
    for ax, step in zip(axes[0], steps):
        rows, chosen = step.stats["sweep"], step.stats.get("threshold")
        macs = [r["macs_ratio"] for r in rows]
        ax.errorbar(macs, [r["drop"] for r in rows], yerr=[r["error"] for r in rows], marker="o", label="drop (points)")
        for r in rows:
            ax.annotate(text(r["threshold"]), (r["macs_ratio"], r["drop"]), fontsize=6, xytext=(2, 3),
                        textcoords="offset points")
        share = ax.twinx()
        share.plot(macs, [100 * r["exit_share"] for r in rows], color="gray", ls="--", marker=".", label="exiting (%)")
        share.set_ylabel("share exiting at batch 1 (%)")
        if chosen is not None:
            ax.axvline(next(r["macs_ratio"] for r in rows if text(r["threshold"]) == text(chosen)), color="green",
                       lw=1, label=f"chosen threshold {text(chosen)}")
        ax.set_xlabel("expected MACs (x the original's)")
        ax.set_ylabel("drop below the full model (points)")
        ax.set_title(f"{step.pass_}: threshold sweep on held-out calibration data")
        ax.legend(fontsize=7, loc="upper right")
    return _png(fig)


def _plot(sens) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for g in sens.groups:
        ax.plot((0,) + sens.ratios_of(g), [sens.base_score] + sens.score[g], marker="o", label=g[-28:])
    ax.set_xlabel("share of the group's channels removed")
    ax.set_ylabel(sens.metric)
    ax.set_title(f"Sensitivity of each channel group (pruned alone, {'with' if sens.recovered else 'no'} recovery)")
    ax.legend(fontsize=6, ncol=2)
    return _png(fig)


def cmd_passes(args: argparse.Namespace, registry: Registry) -> int:
    for cls in registry:
        print(f"{cls.name}: {cls.summary()}")
        print(f"    handles: {', '.join(sorted(cls.handles))}")
        for name, tp, default in cls.option_fields():
            print(f"    {name}: {type_name(tp)} = {default!r}")
    return 0


def _output_path(args: argparse.Namespace) -> Path:
    src, dst = Path(args.input), Path(args.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise InputError("the output path is the input file; onnxcompress never overwrites its input")
    return dst


def cmd_pack(args: argparse.Namespace, registry: Registry) -> int:
    dst = _output_path(args)
    model = io.load_model(args.input)
    blob, stats = container.pack(model)
    container.write(dst, blob)
    original = Path(args.input).stat().st_size
    bound = stats.entropy_bytes
    print(f"{args.input}: {human_bytes(original)} -> {dst}: {human_bytes(stats.bytes)} ({original / stats.bytes:.1f}x smaller)")
    print(f"entropy-coded streams: {human_bytes(stats.coded_bytes)}, their order-0 entropy {human_bytes(bound)}"
          + (f" ({stats.coded_bytes / bound:.3f}x)" if bound else "")
          + f"; tensors by codec: {', '.join(f'{k} {v}' for k, v in stats.tensors.items())}")
    return 0


def cmd_unpack(args: argparse.Namespace, registry: Registry) -> int:
    dst = _output_path(args)
    model = container.load(args.input)
    io.save_model(model, dst)
    print(f"{args.input} -> {dst}: {human_bytes(dst.stat().st_size)}")
    return 0


COMMANDS = {"compress": cmd_compress, "inspect": cmd_inspect, "bench": cmd_bench, "sensitivity": cmd_sensitivity,
            "passes": cmd_passes, "pack": cmd_pack, "unpack": cmd_unpack}


MMAP_THRESHOLD = 2 << 20        # 1 MiB ran the CNN prune-channels 29% slower (every mid-size temporary mmapped); 4 MiB left its quantize 835-867 MB


def _unmap_large_blocks() -> None:
    """glibc serves blocks of MMAP_THRESHOLD bytes and more by mmap, so that each goes back to the
    OS when freed. By default it raises its threshold (up to 32 MiB) as large blocks are freed,
    and onnxruntime's and numpy's batch activations (8-34 MB each) then stay in its heap,
    fragmented: a 25M Transformer's prune-channels peaked at 1077 MB instead of 915 (at 1 MiB)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)       # -3: M_MMAP_THRESHOLD
        except (OSError, AttributeError):                     # not glibc
            pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _unmap_large_blocks()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args, default_registry())
    except CompressError as e:
        print(f"onnxcompress: error: {e}", file=sys.stderr)
        if args.debug:  # the whole chain: what went wrong underneath (`raise ... from e`)
            traceback.print_exception(e, file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("onnxcompress: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for users; --debug shows it
        if args.debug:
            raise
        print(f"onnxcompress: internal error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
