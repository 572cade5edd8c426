"""What the memory savings of the refit's normal equations keep exact: held-out equations kept as
rows score and absorb like a Gram matrix, and the in-place ridge solve leaves G as it found it."""
import numpy as np
import pytest

from onnxcompress.solvers import NormalEquations, _regularized, _solve, solve_free

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
