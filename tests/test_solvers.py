import numpy as np
import pytest
from onnx import helper

from conftest import make_model, rand, run, tensor
from onnxcompress.solvers import (NormalEquations, solve_depthwise_pair, solve_reduced_rank, fit_soft_head, im2col, ridge_fit, soft_targets, softmax,
                                  solve_codebook, solve_columns, solve_scales, solve_support)

rng = np.random.default_rng(0)
X = rng.standard_normal((400, 24))
W_TRUE = rng.standard_normal((6, 24))
B_TRUE = rng.standard_normal(6)


def normal_equations(Y, batches=4):
    ne = NormalEquations(X.shape[1], Y.shape[1])
    for part_x, part_y in zip(np.array_split(X, batches), np.array_split(Y, batches)):
        ne.add(part_x, part_y)  # streamed: same result as one big batch
    return ne


def test_recovers_a_known_weight_matrix_from_noiseless_data():
    W, b = ridge_fit(X, X @ W_TRUE.T + B_TRUE, ridge=0.0)
    assert np.abs(W - W_TRUE).max() < 1e-5 and np.abs(b - B_TRUE).max() < 1e-5


def test_support_constraint_keeps_zeros_exactly_and_fits_the_rest():
    mask = rng.random(W_TRUE.shape) > 0.6
    ne = normal_equations(X @ (W_TRUE * mask).T + B_TRUE)
    W, b = solve_support(ne, mask, ridge=0.0)
    assert np.all(W[~mask] == 0)
    assert np.abs(W - W_TRUE * mask).max() < 1e-5 and np.abs(b - B_TRUE).max() < 1e-5


def test_support_refit_beats_the_masked_original_on_a_dense_target():
    mask = rng.random(W_TRUE.shape) > 0.5
    ne = normal_equations(X @ W_TRUE.T + B_TRUE)
    W, b = solve_support(ne, mask, ridge=0.0)
    assert np.all(W[~mask] == 0)
    assert ne.residual(W, b).sum() < ne.residual(W_TRUE * mask, B_TRUE).sum()


def test_kept_columns_only():
    keep = np.array([0, 3, 5, 10, 11])
    W, _ = solve_columns(normal_equations(X @ W_TRUE.T), keep)
    dropped = np.setdiff1d(np.arange(24), keep)
    assert np.all(W[:, dropped] == 0) and np.any(W[:, keep] != 0)


def test_codebook_values_are_shared_and_recovered():
    codes = np.array([-0.7, 0.1, 0.9, 2.0])
    index = rng.integers(0, 4, W_TRUE.shape)
    c, b = solve_codebook(normal_equations(X @ codes[index].T + B_TRUE), index, 4, ridge=0.0)
    assert np.abs(c - codes).max() < 1e-5 and np.abs(b - B_TRUE).max() < 1e-5
    assert len(np.unique(c[index])) == 4  # the refit weight uses exactly the k shared values


def test_per_channel_scales_over_fixed_binary_weights():
    signs = np.sign(rng.standard_normal(W_TRUE.shape))
    scales = rng.uniform(0.1, 1, 6)
    s, b = solve_scales(normal_equations(X @ (signs * scales[:, None]).T + B_TRUE), signs)
    assert np.abs(s - scales).max() < 1e-6 and np.abs(b - B_TRUE).max() < 1e-6


def test_residual_matches_direct_computation():
    Y = X @ W_TRUE.T + B_TRUE + rng.standard_normal((400, 6))
    ne = normal_equations(Y)
    W, b = ridge_fit(X, Y, ridge=1e-3)
    direct = ((X @ W.T + b - Y) ** 2).mean(0)
    np.testing.assert_allclose(ne.residual(W, b), direct, rtol=1e-8)


def test_soft_targets_average_softened_probabilities():
    z1, z2 = np.array([[2.0, 0.0]]), np.array([[0.0, 2.0]])
    np.testing.assert_allclose(soft_targets([z1, z2], 2.0), [[0.5, 0.5]])
    assert softmax(np.array([[1000.0, 0.0]]))[0, 0] == 1.0  # numerically stable


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_soft_head_reaches_99_percent_agreement_with_a_linear_teacher(alpha):
    feats = rng.standard_normal((1500, 16))
    teacher_w = rng.standard_normal((5, 16)) * 3
    logits = feats @ teacher_w.T
    labels = logits.argmax(1)
    W, b = fit_soft_head(feats, soft_targets([logits], 4.0), temperature=4.0, alpha=alpha, labels=labels)
    agreement = np.mean((feats @ W.T + b).argmax(1) == labels)
    assert agreement >= 0.99


def test_soft_head_respects_a_mask():
    feats = rng.standard_normal((300, 8))
    logits = feats @ rng.standard_normal((3, 8)).T
    mask = rng.random((3, 8)) > 0.5
    W, _ = fit_soft_head(feats, softmax(logits, 2.0), temperature=2.0, mask=mask)
    assert np.all(W[~mask] == 0) and np.any(W[mask] != 0)


@pytest.mark.parametrize("attrs", [dict(pads=[1, 1, 1, 1]), dict(strides=[2, 2], pads=[0, 1, 1, 0]),
                                   dict(dilations=[2, 2])])
def test_im2col_times_weights_is_onnxruntime_conv(attrs):
    x, w = rand(2, 3, 7, 7, seed=1), rand(4, 3, 3, 3, seed=2)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], [tensor("x", [2, 3, 7, 7])],
                       [tensor("y", ["n", "m", "h", "w"])], {"w": w})
    y = run(model, {"x": x})[0]  # [N, M, Ho, Wo]
    rows = im2col(x, (3, 3), tuple(attrs.get("strides", [1, 1])), tuple(attrs.get("pads", [0, 0, 0, 0])),
                  tuple(attrs.get("dilations", [1, 1])))
    ours = (rows @ w.reshape(4, -1).T).reshape(2, -1, 4).transpose(0, 2, 1)
    np.testing.assert_allclose(ours, y.reshape(2, 4, -1), atol=1e-4)
    pos = np.array([[0, 5], [3, 1]])
    picked = im2col(x, (3, 3), tuple(attrs.get("strides", [1, 1])), tuple(attrs.get("pads", [0, 0, 0, 0])),
                    tuple(attrs.get("dilations", [1, 1])), positions=pos)
    np.testing.assert_allclose(picked @ w.reshape(4, -1).T,
                               np.concatenate([y.reshape(2, 4, -1)[i][:, pos[i]].T for i in range(2)]), atol=1e-4)


def test_reduced_rank_regression_recovers_a_rank_k_map_with_bias_and_balances_the_factors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 30)) * np.linspace(0.1, 3, 30) + 1.0
    y = x @ (rng.normal(size=(20, 4)) @ rng.normal(size=(4, 30))).T + 0.5
    ne = NormalEquations(30, 20)
    ne.add(x, y)
    a, b, bias = solve_reduced_rank(ne, 4, ridge=1e-10)
    assert a.shape == (20, 4) and b.shape == (4, 30)
    assert np.abs(x @ b.T @ a.T + bias - y).max() < 1e-5
    assert np.allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1))
    # below the true rank it is the best rank-2 map: no worse than the plain SVD of the true weights
    a2, b2, bias2 = solve_reduced_rank(ne, 2, ridge=1e-10)
    u, s, vt = np.linalg.svd(np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0][:30].T)
    svd = (u[:, :2] * s[:2]) @ vt[:2]
    err_rr = np.mean((x @ b2.T @ a2.T + bias2 - y) ** 2)
    err_svd = np.mean((x @ svd.T + (y - x @ svd.T).mean(0) - y) ** 2)
    assert err_rr < 0.95 * err_svd


def test_alternating_depthwise_pair_converges_to_an_exactly_separable_pair():
    """A depthwise layer (2 filters per channel) then a pointwise one, started from perturbed
    filters: alternating least squares drives the error towards zero."""
    rng = np.random.default_rng(0)
    channels, m, taps, out = 6, 2, 9, 10
    x = rng.normal(size=(4000, channels * taps)) + 0.3
    depth, point = rng.normal(size=(channels * m, taps)), rng.normal(size=(out, channels * m))
    owner = np.arange(channels * m) // m

    def pair(d, p, b):
        z = np.stack([x[:, owner[j] * taps:(owner[j] + 1) * taps] @ d[j] for j in range(len(d))], 1)
        return z @ p.T + b

    y = pair(depth, point, 1.5)
    ne = NormalEquations(channels * taps, out)
    ne.add(x, y)
    start = depth + rng.normal(size=depth.shape) * 0.5
    errs = [np.mean((pair(*solve_depthwise_pair(ne, start, point, 1e-10, iters=k)) - y) ** 2) for k in (0, 3, 10)]
    assert errs[0] > 10 * errs[1] > 100 * errs[2] and errs[2] < 1e-3
    d, p, b = solve_depthwise_pair(ne, start, point, 1e-10, iters=3, max_unknowns=10)   # too many unknowns:
    assert np.array_equal(d, start)                                                    # the filters stay


def test_equations_through_a_linear_map_equal_those_of_the_mapped_inputs():
    m = np.random.default_rng(1).standard_normal((24, 5))
    direct = NormalEquations(5, 6)
    direct.add(X @ m, X @ W_TRUE.T + B_TRUE)
    through = normal_equations(X @ W_TRUE.T + B_TRUE).through(m)
    assert np.allclose(through.G, direct.G) and np.allclose(through.C, direct.C) and through.rows == direct.rows


def test_scipy_blas_runs_on_one_thread_beside_numpys():
    """Two OpenBLAS pools at the core count spin against each other (SparseGPT 35% slower)."""
    from pathlib import Path

    from threadpoolctl import ThreadpoolController

    import onnxcompress.solvers  # noqa: F401 - sets it on import
    scipy_pools = [c for c in ThreadpoolController().lib_controllers if "scipy" in Path(c.filepath).parent.as_posix()]
    assert scipy_pools and all(c.num_threads == 1 for c in scipy_pools)
