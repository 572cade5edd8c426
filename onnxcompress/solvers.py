"""Numerical kernels for recovery: ridge least squares (streamed, constrained) and soft-target fitting.

Pure functions on numpy arrays, no graph in sight. A layer is a linear map y = W x + b with W of
shape [out, in]; every solver works from the normal equations of the inputs X (rows are samples)
and the targets Y, accumulated batch by batch so memory stays bounded however much data is used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
from scipy.linalg import get_lapack_funcs

__all__ = [
    "NormalEquations", "ridge_fit", "solve_free", "solve_reduced_rank", "solve_depthwise_pair", "solve_support", "solve_columns", "solve_codebook",
    "solve_scales", "solve_codebook_groups", "solve_codebook_rows", "softmax", "soft_targets", "fit_soft_head", "im2col", "tile_rows",
    "sparsegpt", "gptq", "kmeans_1d", "kmeans_rows", "nearest",
]


@dataclass
class NormalEquations:
    """Running sums for min ||[X 1] theta - Y||^2: G = [X 1]^T [X 1], C = [X 1]^T Y (float64).

    With `lazy`, the rows themselves ([X 1], float32) are kept instead of G while they take less
    memory than it: held-out equations only score candidate weights (`residual`) and are then
    absorbed, and on a 3x3 conv over 512 channels at 2x2 positions their 200 rows take 4 MB
    where G takes 170 MB. They become a Gram matrix once they would cost more, or when G is read."""
    n_in: int
    n_out: int
    lazy: bool = False
    C: np.ndarray = field(init=False)
    rows: int = 0
    y_sq: np.ndarray = field(init=False)
    _G: np.ndarray | None = field(init=False, default=None, repr=False)
    _pending: list[np.ndarray] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.C = np.zeros((self.n_in + 1, self.n_out))
        self.y_sq = np.zeros(self.n_out)

    @property
    def G(self) -> np.ndarray:
        """The Gram matrix [X 1]^T [X 1], with any rows still kept folded in."""
        if self._G is None:
            self._G = np.zeros((self.n_in + 1, self.n_in + 1))
        for Xa in self._pending:
            self._G += Xa.T @ Xa
        self._pending.clear()
        return self._G

    def add(self, X: np.ndarray, Y: np.ndarray) -> None:
        """Accumulate a batch. Products run in the inputs' precision (float32 activations stay fast);
        the sums are kept in float64."""
        dtype = np.result_type(X.dtype, Y.dtype, np.float32)
        Xa = np.hstack([X.astype(dtype, copy=False), np.ones((len(X), 1), dtype)])
        Y = Y.astype(dtype, copy=False)
        self.C += Xa.T @ Y
        self.y_sq += np.einsum("ij,ij->j", Y, Y, dtype=np.float64)
        self.rows += len(X)
        self._add_rows(Xa)

    def _add_rows(self, Xa: np.ndarray) -> None:
        """Rows [x 1] into G, or kept as they are while lazy and cheaper than G."""
        if self.lazy and self._G is None and \
                sum(p.nbytes for p in self._pending) + Xa.nbytes < 8 * (self.n_in + 1) ** 2:
            self._pending.append(Xa)
        else:
            G = self.G
            G += Xa.T @ Xa

    def absorb(self, other: "NormalEquations") -> "NormalEquations":
        """These equations with `other`'s rows added, in place (a 3x3 conv over 512 channels has a
        G of 170 MB: a merged copy beside both would be a third), returned."""
        G = self.G
        if other._G is not None:
            G += other._G
        for Xa in other._pending:
            G += Xa.T @ Xa
        self.C += other.C
        self.y_sq += other.y_sq
        self.rows += other.rows
        return self

    def through(self, m: np.ndarray) -> "NormalEquations":
        """The equations of the features z = x m (m: [n_in, k]) against the same targets: what a
        layer reading a fixed linear map of these inputs would accumulate."""
        out = NormalEquations(m.shape[1], self.n_out)
        g, k = self.G, m.shape[1]
        out.G[:k, :k], out.G[:k, k] = m.T @ g[:-1, :-1] @ m, m.T @ g[:-1, -1]
        out.G[k, :k], out.G[k, k] = out.G[:k, k], g[-1, -1]
        out.C[:k], out.C[k] = m.T @ self.C[:-1], self.C[-1]
        out.y_sq, out.rows = self.y_sq.copy(), self.rows
        return out

    def ridge(self, ridge: float) -> float:
        """Absolute ridge strength: `ridge` times the mean diagonal of X^T X (scale-free)."""
        d = np.diag(self.G)[:-1]
        return ridge * float(d.mean()) if d.size and d.mean() > 0 else ridge

    def residual(self, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Mean squared error per output of (W, b) on the accumulated data."""
        theta = np.vstack([W.T, b[None, :]])
        # products through BLAS (a three-operand einsum without optimize runs as a plain loop: 25x slower)
        err = self.y_sq - 2 * np.sum(theta * self.C, axis=0) + self._quadratic(theta)
        return np.maximum(err, 0) / max(self.rows, 1)

    def _quadratic(self, theta: np.ndarray) -> np.ndarray:
        """theta^T G theta per output: from G, or from the rows kept (in float64, a few at a time)."""
        if self._G is not None or not self._pending:
            return np.sum(theta * (self.G @ theta), axis=0)
        out = np.zeros(theta.shape[1])
        for Xa in self._pending:
            for i in range(0, len(Xa), 1024):
                z = Xa[i:i + 1024].astype(np.float64) @ theta
                out += np.einsum("ij,ij->j", z, z)
        return out


def _solve(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(A, B)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A, B, rcond=None)[0]


def _one_thread_for_scipy_blas() -> None:
    """scipy's LAPACK (`get_lapack_funcs` below) runs on scipy's own OpenBLAS, beside numpy's. With
    both thread pools at the core count their idle threads spin against each other: SparseGPT's
    144 x 144 factorizations took up to 100 ms instead of 1, and prune-weights on the MNIST ResNet
    ran 35% slower. Here scipy's pool gets one thread; numpy's keeps the heavy products."""
    from pathlib import Path

    from threadpoolctl import ThreadpoolController  # scikit-learn's dependency
    for lib in ThreadpoolController().lib_controllers:
        if "scipy" in Path(lib.filepath).parent.as_posix():   # scipy.libs/, scipy/.dylibs/ (not numpy.libs/)
            lib.set_num_threads(1)


_one_thread_for_scipy_blas()


def _ridge_solve(G: np.ndarray, C: np.ndarray, lam: float, bias: bool) -> np.ndarray:
    """theta [len(G), outputs] solving (G + lam I) theta = C, the last unknown (the bias) not
    shrunk, or held at zero without `bias`, in G's own memory: its Cholesky factor overwrites one
    triangle and the other, untouched, restores it after (a 3x3 conv over 512 channels: no third
    170 MB matrix beside the fit's and the held-out's). A G that is not positive definite there
    is solved on a copy (LU, or least squares where singular)."""
    n = len(G)
    diag, edge = G.diagonal().copy(), G[-1].copy()
    C = C.copy()
    if not bias:            # the bias's row and column become the identity's: its unknown solves to 0
        G[-1], G[:, -1], C[-1] = 0.0, 0.0, 0.0
    G.flat[::n + 1] += lam
    G[-1, -1] = diag[-1] if bias else 1.0
    potrf, potrs = get_lapack_funcs(("potrf", "potrs"), (G,))
    try:
        # G.T is G (symmetric) in Fortran order: the factor goes to G's lower triangle in memory
        factor, info = potrf(G.T, lower=False, overwrite_a=True, clean=False)
        theta, info = potrs(factor, C, lower=False) if info == 0 else (None, info)
    finally:
        _mirror_upper(G)
        G.flat[::n + 1] = diag
        G[-1], G[:, -1] = edge, edge
    if info == 0:
        return theta
    k = n if bias else n - 1
    return np.vstack([_solve(_regularized(G[:k, :k], lam, bias), C[:k]), np.zeros((n - k, C.shape[1]))])


def _mirror_upper(G: np.ndarray, block: int = 256) -> None:
    """Copy G's strictly upper triangle onto its strictly lower one, a block of rows at a time."""
    for i in range(0, len(G), block):
        j = min(i + block, len(G))
        G[i:j, :i] = G[:i, i:j].T
        square = G[i:j, i:j]
        lower = np.tril_indices(j - i, -1)
        square[lower] = square.T[lower]


def _regularized(G: np.ndarray, lam: float, bias: bool) -> np.ndarray:
    """G + _reg(len(G), lam, bias), without the dense diagonal matrix."""
    A = G.copy()
    A.flat[::len(A) + 1] += lam
    if bias:
        A[-1, -1] = G[-1, -1]
    return A


def _reg(n: int, lam: float, bias: bool) -> np.ndarray:
    """Ridge on the weights only: the bias (last unknown) is not shrunk."""
    r = np.full(n, lam)
    if bias:
        r[-1] = 0.0
    return np.diag(r)


def solve_free(ne: NormalEquations, ridge: float = 1e-4, bias: bool = True,
               prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unconstrained ridge fit: returns W [out, in] and b [out] (zeros when `bias` is False).
    With a `prior` [out, in], the ridge shrinks W towards it instead of towards zero."""
    lam = ne.ridge(ridge)
    C = ne.C if prior is None else ne.C + lam * np.vstack([prior.T, np.zeros((1, ne.n_out))])
    theta = _ridge_solve(ne.G, C, lam, bias)
    W = theta[:ne.n_in].T
    b = theta[ne.n_in] if bias else np.zeros(ne.n_out)
    return W, b


def solve_reduced_rank(ne: NormalEquations, rank: int, ridge: float = 1e-4, bias: bool = True,
                       prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best map of rank `rank` from X to Y (reduced-rank regression): returns A [out, rank],
    B [rank, in] and b [out] minimising ||Y - X B^T A^T - b||^2. The full ridge fit W (shrunk
    towards `prior` [out, in] if given, else towards zero) is projected onto the `rank` leading
    directions of its fitted outputs (the left singular vectors of W S^(1/2), S the inputs'
    covariance, centred when there is a bias): A = U_K, B = U_K^T W, balanced so that each rank's
    A column and B row have the same norm; b absorbs what the projection moves at the inputs' mean."""
    w, b = solve_free(ne, ridge, bias, prior)
    n = max(ne.rows, 1)
    mean = ne.G[:ne.n_in, ne.n_in] / n
    cov = ne.G[:ne.n_in, :ne.n_in] / n - (np.outer(mean, mean) if bias else 0.0)
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    root = (vecs * np.sqrt(np.maximum(vals, 0))) @ vecs.T
    u = np.linalg.svd(w @ root, full_matrices=False)[0][:, :rank]
    first = u.T @ w
    scale = np.sqrt(np.maximum(np.linalg.norm(first, axis=1), 1e-30))
    if bias:
        b = b + (w - u @ first) @ mean
    return u * scale, first / scale[:, None], b


def solve_depthwise_pair(ne: NormalEquations, depth: np.ndarray, point: np.ndarray, ridge: float = 1e-4,
                         bias: bool = True, iters: int = 3,
                         max_unknowns: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alternating least squares for a depthwise conv (`depth` [I m, taps]: row j filters input
    channel j // m) followed by a pointwise one (`point` [out, I m]) from the equations of the
    depthwise conv's input patches (columns channel-major, `ne.n_in` = I taps) onto the pair's
    target. Each step is exact given the other factor: the pointwise weights (and bias) from the
    depthwise outputs' moments, then the depthwise filters, all I m taps of them at once (skipped
    above `max_unknowns`). Returns (depth, point, bias)."""
    n, (rows_d, taps) = ne.n_in, depth.shape
    channel = np.arange(rows_d) // (rows_d // (n // taps))
    h, sums, cxy = ne.G[:n, :n], ne.G[:n, n], ne.C[:n]
    block = np.zeros((n, rows_d))                   # x -> depthwise outputs: z = block^T x

    def to_block(d: np.ndarray) -> np.ndarray:
        block[:] = 0
        block[channel[:, None] * taps + np.arange(taps), np.arange(rows_d)[:, None]] = d
        return block

    def pointwise(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return solve_free(ne.through(to_block(d)), ridge, bias)

    point, b = pointwise(depth)
    if rows_d * taps > max_unknowns:
        return depth, point, b
    hx = h.reshape(n // taps, taps, n // taps, taps)
    for _ in range(iters):
        gram = (point.T @ point)[:, None, :, None] * hx[channel][:, :, channel]
        gram = gram.reshape(rows_d * taps, rows_d * taps)
        rhs = ((cxy - np.outer(sums, b)) @ point)[channel[:, None] * taps + np.arange(taps), np.arange(rows_d)[:, None]]
        lam = ridge * max(float(np.mean(np.diag(gram))), 1e-30)
        depth = _solve(gram + lam * np.eye(len(gram)), rhs.reshape(-1)).reshape(rows_d, taps)
        point, b = pointwise(depth)
    return depth, point, b


def ridge_fit(X: np.ndarray, Y: np.ndarray, ridge: float = 1e-4, bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares of Y on X in one call (see `solve_free`)."""
    ne = NormalEquations(X.shape[1], Y.shape[1])
    ne.add(X, Y)
    return solve_free(ne, ridge, bias)


def solve_support(ne: NormalEquations, mask: np.ndarray, ridge: float = 1e-4,
                  bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Refit with a fixed support: W[o, i] is free where mask[o, i], and exactly zero elsewhere."""
    lam = ne.ridge(ridge)
    W, b = np.zeros((ne.n_out, ne.n_in)), np.zeros(ne.n_out)
    for o in range(ne.n_out):
        idx = np.flatnonzero(mask[o])
        if bias:
            idx = np.append(idx, ne.n_in)
        if idx.size == 0:
            continue
        theta = _solve(ne.G[np.ix_(idx, idx)] + _reg(idx.size, lam, bias), ne.C[idx, o])
        if bias:
            W[o, idx[:-1]], b[o] = theta[:-1], theta[-1]
        else:
            W[o, idx] = theta
    return W, b


def solve_columns(ne: NormalEquations, keep: np.ndarray, ridge: float = 1e-4,
                  bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Refit using only the kept input columns `keep` (indices or a boolean mask); others stay zero."""
    mask = np.zeros((ne.n_out, ne.n_in), dtype=bool)
    mask[:, keep] = True
    return solve_support(ne, mask, ridge, bias)


def solve_codebook(ne: NormalEquations, index: np.ndarray, k: int, ridge: float = 1e-4,
                   bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Refit shared codebook values: W[o, i] = c[index[o, i]]; solves the k centroids (and biases).

    The layer is linear in c: y_o = sum_k c_k (sum_{i: index[o,i]=k} x_i) + b_o, so the normal
    equations in (c, b) follow from G by summing rows and columns per code."""
    n_out, n_in = index.shape
    Gxx, gx1, n = ne.G[:n_in, :n_in], ne.G[:n_in, n_in], ne.G[n_in, n_in]
    H = np.zeros((k + n_out, k + n_out))
    r = np.zeros(k + n_out)
    for o in range(n_out):
        A = np.zeros((n_in, k))
        A[np.arange(n_in), index[o]] = 1.0
        H[:k, :k] += A.T @ Gxx @ A
        r[:k] += A.T @ ne.C[:n_in, o]
        if bias:
            H[:k, k + o] = H[k + o, :k] = A.T @ gx1
            H[k + o, k + o] = n
            r[k + o] = ne.C[n_in, o]
    size = k + (n_out if bias else 0)
    lam = ne.ridge(ridge) * 1e-3  # a few shared values: barely any shrinkage needed
    theta = _solve(H[:size, :size] + np.diag(np.r_[np.full(k, lam), np.zeros(size - k)]), r[:size])
    c = theta[:k]
    b = theta[k:] if bias else np.zeros(n_out)
    return c, b


def solve_scales(ne: NormalEquations, B: np.ndarray, bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel scales over fixed weights B (binary or integer): W[o] = s[o] * B[o]."""
    n_in = ne.n_in
    s, b = np.zeros(ne.n_out), np.zeros(ne.n_out)
    for o in range(ne.n_out):
        u = np.append(B[o].astype(np.float64), 0.0)  # z = x . B[o]
        e = np.zeros(n_in + 1)
        e[-1] = 1.0
        basis = np.stack([u, e], 1) if bias else u[:, None]
        theta = _solve(basis.T @ ne.G @ basis + 1e-12 * np.eye(basis.shape[1]), basis.T @ ne.C[:, o])
        s[o] = theta[0]
        b[o] = theta[1] if bias else 0.0
    return s, b


# -- soft targets -------------------------------------------------------------------------------

def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = z.astype(np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


HEAD_WORK = 2e8   # rows x classes x features a head fit spends its full iteration count on


def soft_targets(teacher_logits: list[np.ndarray], temperature: float) -> np.ndarray:
    """An ensemble's target: the average of the members' temperature-softened probabilities."""
    return np.mean([softmax(z, temperature) for z in teacher_logits], axis=0)


def fit_soft_head(H: np.ndarray, targets: np.ndarray, temperature: float = 4.0, alpha: float = 0.0,
                  labels: np.ndarray | None = None, W0: np.ndarray | None = None, b0: np.ndarray | None = None,
                  mask: np.ndarray | None = None, l2: float = 1e-4, max_iter: int = 300,
                  fit_bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fit a linear head z = H W^T + b (W [classes, features]) to softened teacher probabilities.

    Loss (Hinton et al.): alpha * CE(labels, softmax(z)) + (1 - alpha) * T^2 * CE(targets, softmax(z / T)),
    plus l2 * ||W||^2 / 2, averaged over samples. Convex in (W, b); solved by L-BFGS. Entries where
    `mask` is False are held at zero; without `fit_bias` the bias stays at b0."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    n, d = H.shape
    k = targets.shape[1]
    H = H.astype(np.float64)
    W0 = np.zeros((k, d)) if W0 is None else W0.astype(np.float64)
    b0 = np.zeros(k) if b0 is None else b0.astype(np.float64)
    m = np.ones((k, d)) if mask is None else mask.astype(np.float64)
    onehot = None
    if alpha > 0:
        if labels is None:
            raise ValueError("alpha > 0 needs labels")
        onehot = np.eye(k)[labels.reshape(-1)]
    scale = 1.0 / max(float(np.abs(H).mean()), 1e-12)  # condition the problem: work on scaled features
    Hs = (H * scale).astype(np.float32)
    targets = targets.astype(np.float32)
    onehot = None if onehot is None else onehot.astype(np.float32)
    # a large head (a sequence over thousands of classes) gets fewer iterations: the warm start is close
    max_iter = int(np.clip(max_iter * HEAD_WORK / max(n * k * d, 1), 30, max_iter))

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # float32 where the work is (the [rows, classes] products), float64 for the optimizer
        W = (theta[:k * d].reshape(k, d) * m).astype(np.float32)
        b = theta[k * d:].astype(np.float32)
        z = Hs @ W.T + b
        log_p = _log_softmax(z / temperature)
        loss = -(1 - alpha) * temperature ** 2 * float(np.sum(targets * log_p, dtype=np.float64)) / n
        dz = (1 - alpha) * temperature * (np.exp(log_p) - targets) / n
        if onehot is not None:
            log_p = _log_softmax(z)
            loss += -alpha * float(np.sum(onehot * log_p, dtype=np.float64)) / n
            dz += alpha * (np.exp(log_p) - onehot) / n
        loss += 0.5 * l2 * float(np.sum(theta[:k * d] ** 2 * m.ravel()))
        gW = (dz.T @ Hs).astype(np.float64) * m + l2 * theta[:k * d].reshape(k, d) * m
        return loss, np.concatenate([gW.ravel(), dz.sum(0, dtype=np.float64) if fit_bias else np.zeros(k)])

    theta0 = np.concatenate([(W0 / scale * m).ravel(), b0])
    # One BLAS thread: the products are small and L-BFGS calls BLAS on short vectors thousands of
    # times; with OpenBLAS's threads waiting on a busy 2-core machine, a 200 x 1152 head took 23 s
    # instead of 0.43 s.
    with threadpool_limits(1, user_api="blas"):
        res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    W = res.x[:k * d].reshape(k, d) * m * scale
    return W, res.x[k * d:]


# -- weight sharing -------------------------------------------------------------------------------

KMEANS_SAMPLE = 200_000   # values k-means fits on (all are assigned): enough for 256 centroids in 1-D


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", seed: int = 0) -> np.ndarray:
    """At most k sorted centroids for scalar values (scikit-learn's Lloyd k-means). `init`:
    "linear" (evenly spaced over [min, max], what Deep Compression found best: large weights keep
    their own centroids), "density" (the values' quantiles) or "k-means++". Values with at most k
    distinct entries get exactly those."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    v = values.astype(np.float64).ravel()
    distinct = np.unique(v)
    if len(distinct) <= k:
        return distinct
    if len(v) > KMEANS_SAMPLE:
        v = np.random.default_rng(seed).choice(v, KMEANS_SAMPLE, replace=False)
    if init == "linear":
        start = np.linspace(v.min(), v.max(), k).reshape(-1, 1)
    elif init == "density":
        start = np.quantile(v, (np.arange(k) + 0.5) / k).reshape(-1, 1)
    else:
        start = "k-means++"
    with warnings.catch_warnings():   # fewer distinct clusters than k (duplicate values): fine here
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(k, init=start, n_init=1, random_state=seed).fit(v.reshape(-1, 1))
    return np.unique(km.cluster_centers_.ravel())


def kmeans_rows(rows: np.ndarray, k: int, init: str = "linear", iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means of every row at once (Lloyd's iterations, vectorized over rows; per-channel
    codebooks): (books [rows, k] sorted, index [rows, n]). Exact zeros are not clustered: when a
    row has any, 0.0 is one of its k centroids and only its zeros take it. `init` "linear" spaces
    the others evenly over the row's nonzero [min, max], "density" puts them at its quantiles."""
    x = rows.astype(np.float64)
    c_rows, n = x.shape
    zero = x == 0
    kk = k - 1 if zero.any() else k
    weight = (~zero).astype(np.float64)
    lo, hi = np.where(zero, np.inf, x).min(1), np.where(zero, -np.inf, x).max(1)
    lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)     # an all-zero row: 0
    if init == "density":
        filled = np.where(zero, np.nan, x)
        with np.errstate(all="ignore"):
            c = np.nanquantile(filled, (np.arange(kk) + 0.5) / kk, axis=1).T if (~zero).any() else np.zeros((c_rows, kk))
        c = np.where(np.isfinite(c), c, lo[:, None])
    else:
        c = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, kk)[None, :]
    span = float(np.max(hi - lo, initial=0.0)) * 4 + 1.0
    row = np.arange(c_rows)[:, None]
    shift, base = row * span, row * kk                                # rows set apart on one line: one searchsorted

    def assign(c: np.ndarray) -> np.ndarray:
        mid = ((c[:, 1:] + c[:, :-1]) / 2 + shift).ravel()
        return np.searchsorted(mid, (x + shift).ravel()).reshape(c_rows, n) - row * (kk - 1)

    for _ in range(iters):
        c = np.sort(c, 1)
        idx = assign(c)
        flat = (base + idx).ravel()
        total = np.bincount(flat, (weight * x).ravel(), c_rows * kk).reshape(c_rows, kk)
        count = np.bincount(flat, weight.ravel(), c_rows * kk).reshape(c_rows, kk)
        new = np.where(count > 0, total / np.maximum(count, 1e-300), c)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = new
    c = np.sort(c, 1)
    idx = assign(c)
    if kk == k:
        return c, idx
    books = np.sort(np.concatenate([c, np.zeros((c_rows, 1))], 1), 1)
    slot = np.argmax(books == 0, 1)[:, None]                           # where 0.0 sits in each row's book
    return books, np.where(zero, slot, idx + (idx >= slot))


def nearest(values: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of a sorted `book` for every value (same shape)."""
    book = np.asarray(book, dtype=np.float64)
    mid = (book[1:] + book[:-1]) / 2
    return np.searchsorted(mid, values.astype(np.float64), side="left")


# -- pruning with reconstruction ---------------------------------------------------------------

def sparsegpt(rows: np.ndarray, gram: np.ndarray, n_zero: int, damp: float = 0.01, block: int = 128,
              project: Callable[[np.ndarray, int], np.ndarray] | None = None) -> np.ndarray:
    """SparseGPT (Frantar & Alistarh, 2023): zero `n_zero` of `rows` [out, fan_in] while updating
    the weights that stay, so that rows @ x changes least over inputs with Gram matrix `gram`
    (X^T X, [fan_in, fan_in]). Columns go left to right in blocks; in each block the weights with
    the lowest OBS saliency w^2 / [H^-1]_cc^2 are zeroed (the block's share of `n_zero`), and the
    error of each zeroed weight is spread over the later columns through the Cholesky factor of
    H^-1 (H damped by `damp` x its mean diagonal). With `project(column, j)` (the column's values
    mapped onto the values allowed there), the weights that stay are rounded as they go: GPTQ
    (Frantar et al., 2023), see `gptq`.

    `gram` may also be [fan_in + 1, fan_in + 1], the inputs' Gram with a column of ones last (as
    `recovery.sequential` gives it, C-ordered): the factor is then computed in its own memory and
    the matrix restored on return (a 3x3 conv over 512 channels: no 170 MB copy)."""
    W = rows.astype(np.float64)
    dead = np.diag(gram)[:W.shape[1]] <= 0          # inputs that are always zero: their weights do nothing
    W[:, dead] = 0.0
    if len(gram) == W.shape[1] + 1 and gram.dtype == np.float64 and gram.flags.c_contiguous:
        with _factor_in_place(gram, dead, damp) as U:
            return _obs_sweep(W, U, n_zero, block, project)
    return _obs_sweep(W, _inverse_cholesky(gram[:W.shape[1], :W.shape[1]], dead, damp), n_zero, block, project)


def _obs_sweep(W: np.ndarray, U: np.ndarray, n_zero: int, block: int,
               project: Callable[[np.ndarray, int], np.ndarray] | None) -> np.ndarray:
    """`sparsegpt`'s column sweep over W (float64, changed in place and returned) with U^T U = H^-1.
    Only U's upper triangle and diagonal are read."""
    cols = W.shape[1]
    done = 0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].copy(), U[i1:i2, i1:i2]
        E = np.zeros_like(W1)
        k = int(round(n_zero * i2 / cols)) - done
        done += k
        prune = np.zeros(W1.shape, dtype=bool)
        if k > 0:
            score = W1 ** 2 / np.diag(U1)[None, :] ** 2
            prune.flat[np.argpartition(score.ravel(), k - 1)[:k]] = True
        for j in range(i2 - i1):
            q = np.where(prune[:, j], 0.0, W1[:, j] if project is None else project(W1[:, j], i1 + j))
            err = (W1[:, j] - q) / U1[j, j]
            W1[:, j:] -= np.outer(err, U1[j, j:])
            W1[:, j] = q
            E[:, j] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return W


def _inverse_cholesky(gram: np.ndarray, dead: np.ndarray, damp: float) -> np.ndarray:
    """U upper triangular with U^T U = H^-1 (see `_inverse_factor`), in a copy of `gram`. Its
    strictly lower triangle keeps H: `_obs_sweep` reads U's upper triangle and diagonal only."""
    H = np.array(gram, dtype=np.float64, order="F")
    _inverse_factor(H, dead, damp)
    return H.T


@contextmanager
def _factor_in_place(gram: np.ndarray, dead: np.ndarray, damp: float) -> Iterator[np.ndarray]:
    """`_inverse_cholesky` of gram[:-1, :-1] (gram C-ordered, its last row and column the ones
    column's) in gram's own memory: the block moves to the front of the buffer, contiguous, and is
    factored there in one triangle; on exit the other triangle, the saved diagonal and edge
    restore gram exactly (a 3x3 conv over 512 channels: no second 170 MB matrix)."""
    n = len(gram) - 1
    row, col = gram[-1].copy(), gram[:, -1].copy()
    flat = gram.reshape(-1)
    for i in range(n):                  # row i moves i elements down: rows after it are not reached
        flat[i * n:(i + 1) * n] = flat[i * (n + 1):i * (n + 1) + n]
    block = flat[:n * n].reshape(n, n)
    diag = block.diagonal().copy()
    try:
        _inverse_factor(block.T, dead, damp)
        yield block
    finally:
        _mirror_upper(block.T)
        block.flat[::n + 1] = diag
        for i in reversed(range(n)):
            flat[i * (n + 1):i * (n + 1) + n] = flat[i * n:(i + 1) * n]
        gram[-1], gram[:, -1] = row, col


def _inverse_factor(H: np.ndarray, dead: np.ndarray, damp: float) -> None:
    """H (float64, Fortran-ordered, symmetric) gets in its lower triangle L with L L^T = H^-1, H
    with its `dead` diagonal set to 1 and damped by `damp` x its mean diagonal (ten times more at
    each try while H is not positive definite), so that U = L^T is H.T's upper triangle.
    Factored, inverted and factored again in H's memory (LAPACK potrf, potri, potrf in place):
    numpy's inv and cholesky would hold four matrices. H's strictly upper triangle stays as it was."""
    potrf, potri = get_lapack_funcs(("potrf", "potri"), (H,))
    diag = H.diagonal().copy()
    for attempt in range(4):
        if attempt:                                                # the failed try's lower triangle goes
            _mirror_upper(H)
            H.flat[::len(H) + 1] = diag
        H[dead, dead] = 1.0
        H.flat[::len(H) + 1] += damp * 10 ** attempt * np.mean(np.diag(H))   # F order: the same diagonal
        out, info = potrf(H, lower=True, overwrite_a=True, clean=False)
        if info == 0:
            out, info = potri(out, lower=True, overwrite_c=True)   # H^-1, in its lower triangle
        if info == 0:
            out, info = potrf(out, lower=True, overwrite_a=True, clean=False)   # reads the lower triangle only
        if not np.shares_memory(out, H):
            H[...] = out
        if info == 0:
            return
    raise np.linalg.LinAlgError("the inputs' Gram matrix cannot be factored")


def gptq(rows: np.ndarray, gram: np.ndarray, project: Callable[[np.ndarray, int], np.ndarray],
         damp: float = 0.01, block: int = 128) -> np.ndarray:
    """Data-aware rounding (GPTQ, the OBS update of Frantar et al., 2023): every weight of `rows`
    [out, fan_in] becomes `project(column, j)` of its column (nearest centroid of a codebook, a
    grid step, zero kept zero), column by column, each rounding error spread over the columns not
    yet rounded so that rows @ x changes least over inputs with Gram matrix `gram` (either shape
    `sparsegpt` takes)."""
    return sparsegpt(rows, gram, 0, damp, block, project)


# -- convolution as rows ------------------------------------------------------------------------

def im2col(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], pads: tuple[int, ...],
           dilations: tuple[int, ...], positions: np.ndarray | None = None) -> np.ndarray:
    """Patches of a 2-D conv input x [N, C, H, W] -> rows [N * P, C * kh * kw] (channel-major, as
    in ONNX Conv weights). `positions` optionally selects output positions (flat indices into the
    output's H_out * W_out) per image: an array [N, P]."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    if positions is None:
        positions = np.broadcast_to(np.arange(ho * wo), (n, ho * wo))
    oy, ox = np.divmod(positions, wo)  # [N, P]
    ky, kx = np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij")
    rows = oy[:, :, None] * sh + ky.ravel()[None, None, :]   # [N, P, K]
    cols = ox[:, :, None] * sw + kx.ravel()[None, None, :]
    patches = xp[np.arange(n)[:, None, None, None], np.arange(c)[None, None, :, None],
                 rows[:, :, None, :], cols[:, :, None, :]]   # [N, P, C, K]
    return patches.reshape(n * positions.shape[1], c * kh * kw)


def tile_rows(x: np.ndarray, kernel: tuple[int, int], positions: np.ndarray) -> np.ndarray:
    """Rows of a tiling ConvTranspose (stride = kernel, see `layers.tiling_geometry`) in the
    layout of its `out_rows`, [N * P, C * kh * kw]: output position (oy, ox) reads input pixel
    (oy // kh, ox // kw) through kernel tap (oy % kh, ox % kw), every other column zero.
    `positions` [N, P] are flat indices into the output's (H * kh) * (W * kw)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oy, ox = np.divmod(positions, w * kw)
    pixels = x[np.arange(n)[:, None, None], np.arange(c)[None, None, :], (oy // kh)[:, :, None], (ox // kw)[:, :, None]]
    tap = ((oy % kh) * kw + ox % kw).reshape(-1)                  # [N * P]
    rows = np.zeros((n * positions.shape[1], c, kh * kw), x.dtype)
    rows[np.arange(len(tap)), :, tap] = pixels.reshape(-1, c)
    return rows.reshape(len(tap), c * kh * kw)


def _codebook_rows(ne: NormalEquations, index_row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For one output whose weights are c[index_row]: A (n_in x k) with A[i, index_row[i]] = 1."""
    A = np.zeros((ne.n_in, k))
    A[np.arange(ne.n_in), index_row] = 1.0
    return A, ne.G[:ne.n_in, :ne.n_in] @ A


def solve_codebook_groups(eqs: list[NormalEquations], indices: list[np.ndarray], k: int, ridge: float = 1e-4,
                          bias: bool = True, fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One codebook shared by every output of several groups (a grouped conv: one set of normal
    equations per group, `indices[g]` the [outputs, n_in] codes of group g). Solves the k centroids
    and each output's bias jointly; centroids where `fixed` is True keep the value 0 (a pruned
    layer's zeros stay exactly zero). Returns (c [k], b [total outputs])."""
    n_out = sum(len(ix) for ix in indices)
    free = np.ones(k, bool) if fixed is None else ~fixed
    H, r = np.zeros((k + n_out, k + n_out)), np.zeros(k + n_out)
    o = 0
    for ne, index in zip(eqs, indices):
        gx1, n = ne.G[:ne.n_in, ne.n_in], ne.G[ne.n_in, ne.n_in]
        for j, row in enumerate(index):   # j: the output inside its group; o: over all groups
            A, GA = _codebook_rows(ne, row, k)
            H[:k, :k] += A.T @ GA
            r[:k] += A.T @ ne.C[:ne.n_in, j]
            if bias:
                H[:k, k + o] = H[k + o, :k] = A.T @ gx1
                H[k + o, k + o] = n
                r[k + o] = ne.C[ne.n_in, j]
            o += 1
    keep = np.r_[free, np.full(n_out, bias)]
    lam = np.mean([ne.ridge(ridge) for ne in eqs]) * 1e-3
    sub = H[np.ix_(keep, keep)] + np.diag(np.r_[np.full(free.sum(), lam), np.zeros(keep.sum() - free.sum())])
    theta = np.zeros(k + n_out)
    theta[keep] = _solve(sub, r[keep])
    return theta[:k], (theta[k:] if bias else np.zeros(n_out))


def solve_codebook_rows(ne: NormalEquations, index: np.ndarray, books: np.ndarray, ridge: float = 1e-4,
                        bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One codebook per output (per-channel clustering): each output o solves its own centroids
    `books[o]` (k) and bias from the shared normal equations; zero centroids stay zero."""
    k = books.shape[1]
    new, b = books.astype(np.float64).copy(), np.zeros(ne.n_out)
    gx1, n = ne.G[:ne.n_in, ne.n_in], ne.G[ne.n_in, ne.n_in]
    lam = ne.ridge(ridge) * 1e-3
    for o, row in enumerate(index):
        A, GA = _codebook_rows(ne, row, k)
        free = books[o] != 0
        H = np.zeros((k + 1, k + 1))
        H[:k, :k], H[:k, k], H[k, :k], H[k, k] = A.T @ GA, A.T @ gx1, A.T @ gx1, n
        r = np.r_[A.T @ ne.C[:ne.n_in, o], ne.C[ne.n_in, o]]
        keep = np.r_[free, bias]
        theta = np.zeros(k + 1)
        theta[keep] = _solve(H[np.ix_(keep, keep)] + lam * np.diag(np.r_[np.ones(free.sum()), np.zeros(int(bias))]), r[keep])
        new[o, free], b[o] = theta[:k][free], theta[k]
    return new, b
