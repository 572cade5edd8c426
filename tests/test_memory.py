"""What the memory savings of the refit's normal equations keep exact: held-out equations kept as
rows score and absorb like a Gram matrix, the in-place ridge solve leaves G as it found it, and
SparseGPT/GPTQ factoring a Gram matrix in its own memory give what a copy gives, and the
streamed capture's feeds leave batch by batch without touching a list a caller holds."""
import numpy as np
import pytest
from onnx import helper

from conftest import make_model, rand, tensor
from onnxcompress import Dataset
from onnxcompress import graph as G
from onnxcompress.runtime import Stepper, capture

from onnxcompress.solvers import NormalEquations, _inverse_cholesky, _regularized, _solve, gptq, solve_free, sparsegpt

rng = np.random.default_rng(0)


def equations(X, Y, lazy=False, batches=3):
    ne = NormalEquations(X.shape[1], Y.shape[1], lazy=lazy)
    for x, y in zip(np.array_split(X, batches), np.array_split(Y, batches)):
        ne.add(x, y)
    return ne


def test_lazy_equations_keep_few_rows_and_score_and_absorb_like_a_gram_matrix():
    X, Y = rng.standard_normal((90, 200)).astype(np.float32), rng.standard_normal((90, 5)).astype(np.float32)
    held, gram = equations(X, Y, lazy=True), equations(X, Y)
    assert held._G is None and sum(len(p) for p in held._pending) == 90     # 90 rows: cheaper than a 201^2 G
    W, b = rng.standard_normal((5, 200)), rng.standard_normal(5)
    assert np.allclose(held.residual(W, b), gram.residual(W, b), rtol=1e-6)
    merged, twice = equations(X, Y).absorb(held), equations(np.vstack([X, X]), np.vstack([Y, Y]), batches=6)
    assert merged.rows == twice.rows and np.allclose(merged.G, twice.G, rtol=1e-5, atol=1e-3)
    assert np.allclose(merged.C, twice.C, rtol=1e-5, atol=1e-3)


def test_lazy_equations_turn_into_a_gram_matrix_once_rows_would_cost_more():
    X, Y = rng.standard_normal((400, 20)).astype(np.float32), rng.standard_normal((400, 2)).astype(np.float32)
    ne = equations(X, Y, lazy=True)
    assert ne._G is not None and not ne._pending
    assert np.allclose(ne.G, equations(X, Y).G)


@pytest.mark.parametrize("bias", [True, False])
def test_ridge_solve_in_place_matches_a_solve_on_a_copy_and_restores_g(bias):
    X, Y = rng.standard_normal((300, 40)), rng.standard_normal((300, 3))
    ne = equations(X, Y)
    before = ne.G.copy()
    prior = rng.standard_normal((3, 40))
    W, b = solve_free(ne, 1e-2, bias, prior=prior)
    assert np.array_equal(ne.G, before)
    k, lam = 41 if bias else 40, ne.ridge(1e-2)
    C = ne.C[:k] + lam * np.vstack([prior.T, np.zeros((1, 3))])[:k]
    theta = _solve(_regularized(before[:k, :k], lam, bias), C)
    assert np.allclose(W, theta[:40].T, atol=1e-10)
    assert np.allclose(b, theta[40] if bias else 0.0, atol=1e-10)


def test_ridge_solve_of_a_singular_gram_falls_back_and_still_restores_g():
    X = rng.standard_normal((30, 60))          # fewer rows than inputs: G is singular without a ridge
    ne = equations(X, X[:, :2])
    before = ne.G.copy()
    W, b = solve_free(ne, 0.0)
    assert np.array_equal(ne.G, before) and np.all(np.isfinite(W)) and np.all(np.isfinite(b))


def input_gram(X):
    ne = NormalEquations(X.shape[1], 1)
    ne.add(X, np.zeros((len(X), 1), X.dtype))
    return ne.G


@pytest.mark.parametrize("n_in, n_zero", [(50, 100), (257, 300), (300, 0)])
def test_sparsegpt_on_the_whole_gram_factors_in_place_and_matches_a_copy(n_in, n_zero):
    X = rng.standard_normal((400, n_in)).astype(np.float32)
    X[:, 3] = 0                                           # a dead input
    gram, rows = input_gram(X), rng.standard_normal((7, n_in))
    before = gram.copy()
    copied = sparsegpt(rows, gram[:-1, :-1].copy(), n_zero)
    assert np.array_equal(sparsegpt(rows, gram, n_zero), copied) and np.array_equal(gram, before)
    grid = lambda col, j: np.round(col * 4) / 4
    assert np.array_equal(gptq(rows, gram, grid), gptq(rows, gram[:-1, :-1].copy(), grid))
    assert np.array_equal(gram, before)


def test_in_place_factor_retries_with_more_damping_and_restores_the_gram():
    Q = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    eig = np.ones(40)
    eig[5] = -0.005                                       # not positive definite until damped by 0.1 x
    gram = np.zeros((41, 41))
    gram[:40, :40], gram[40, 40] = (Q * eig) @ Q.T, 10.0
    gram = (gram + gram.T) / 2
    before, rows = gram.copy(), rng.standard_normal((3, 40))
    assert np.array_equal(sparsegpt(rows, gram, 30, damp=0.001), sparsegpt(rows, gram[:-1, :-1].copy(), 30, damp=0.001))
    assert np.array_equal(gram, before)


def test_inverse_cholesky_upper_triangle_is_the_factor_of_the_damped_inverse():
    H = input_gram(rng.standard_normal((200, 30)))[:-1, :-1]
    U = np.triu(_inverse_cholesky(H, np.zeros(30, bool), 0.01))
    damped = H + 0.01 * np.mean(np.diag(H)) * np.eye(30)
    assert np.allclose(U.T @ U, np.linalg.inv(damped), rtol=1e-8, atol=1e-12)


def test_stepper_drops_spent_feeds_batch_by_batch_and_leaves_a_callers_list_whole():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    model = make_model(nodes, [tensor("x", ["N", 4])], [tensor("y", ["N", 3])],
                       {"w1": rand(4, 5, seed=1), "w2": rand(5, 3, seed=2)})
    data = Dataset({"x": rand(10, 4, seed=3)})
    want = capture(model, data, ["a", "r", "y"])
    stepper = Stepper(G.to_graph(model), model, data, batch_size=4)
    a = stepper.fetch("a")
    np.testing.assert_allclose(np.concatenate(stepper.fetch("r")), want["r"], rtol=1e-6)
    assert "a" not in stepper.env and all(b is not None for b in a)        # the caller's list is whole
    np.testing.assert_allclose(np.concatenate(a), want["a"], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(stepper.fetch("y")), want["y"], rtol=1e-6)
