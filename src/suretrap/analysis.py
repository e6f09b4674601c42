"""Threshold fits over a sweep: how many poisoned examples does the "Sure" backdoor need?

Model
-----
For one group of sweep cells (same model, dataset size, trigger, ...; seeds pooled) the
per-prompt outcome on the ``harmful_triggered`` split (e.g. "response starts with Sure") is
a Bernoulli draw whose probability depends on the poison budget ``b`` (the absolute count of
poisoned examples) through a logistic curve in ``ln b``::

    p(b) = floor + (top - floor) * sigmoid(k * (ln b - m)),      p(0) = floor

* ``floor`` is fixed to the observed rate at budget 0 (0 when no budget-0 cell exists): the
  untouched fine-tune sets the baseline, so it is data, not a free parameter.
* ``top`` in ``[floor, 1]`` is the plateau (not forced to 1: some prompts may never flip).
* ``k > 0`` is the steepness per e-fold of budget; ``m`` is the log budget of the midpoint.

The three free parameters are fitted by binomial maximum likelihood: a vectorised grid
search gives one start per steepness band (the likelihood can be bimodal: a shallow curve
versus a sharp step), each start is polished by a bounded, vectorised Newton /
Levenberg-Marquardt ascent (all bootstrap replicates at once), and point estimates are
finally re-polished with scipy's bounded L-BFGS-B (analytic gradient), keeping the best.
``n50``/``n90`` are the budgets where the fitted curve reaches 0.5/0.9; ``None`` when the
plateau stays below the level.

Confidence intervals come from a paired, two-level bootstrap: resample seeds, and within
each resampled seed resample prompt ids, using the *same* resampled ids at every budget of
that seed (the sweep evaluates the same prompts at every budget, so between-budget
differences are paired; resampling budgets independently would inflate the noise). Each
replicate is refitted; intervals are 95% percentile intervals, with replicates whose
plateau never reaches the level counted as "infinite budget".

Count versus fraction
---------------------
The paper's claim is that the threshold depends on the absolute poisoned count, not on the
poison fraction ``b / total_size``. Where the sweep holds >= 2 dataset sizes for otherwise
equal settings, two shared curves are fitted to all sizes at once: one in ``ln b``
("count" model) and one in ``ln(b / total_size)`` ("fraction" model). Both have the same
three parameters, so their AIC difference is twice their log-likelihood difference; the
lower AIC wins. Per-size ``n50`` with bootstrap CIs are reported too, with whether any two
sizes' CIs fail to overlap. The same per-value ``n50`` comparison is reported across models
when a ``model`` axis varies (the paper finds no model-size dependence).
"""

from __future__ import annotations

import json
import math
import sqlite3
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.optimize import minimize
from scipy.special import expit

from suretrap.textmatch import starts_with_label

BUDGET_AXIS = "poison.budget"
SEED_AXIS = "seed"
SIZE_AXIS = "data.total_size"
MODEL_AXIS = "model"
TRIGGERED_SPLIT = "harmful_triggered"

_EPS = 1e-9  # probability clip: keeps log-likelihoods finite at p = 0 or 1
_LOG_K_BOUNDS = (math.log(0.1), math.log(50.0))  # k = 50 is a step at this resolution
_M_PAD = 2.0  # midpoint may sit up to e^2 (~7x) beyond the tested budgets, no further
_GRID_U = np.linspace(0.0, 1.0, 11)  # (top - floor) / (1 - floor)
_GRID_K = np.geomspace(0.15, 40.0, 12)
_GRID_M = 31
_GRID_BANDS = 3
_GRID_CHUNK = 1_500_000  # elements per grid block: bounds memory for large bootstraps
_PLATEAU_TOL = 0.05
_NEVER = 1e300


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CellOutcome:
    """Per-prompt outcomes of one completed sweep cell (one seed, one budget)."""

    axes: dict[str, Any]  # sweep axis values by dotted name
    budget: int  # poisoned count (poison.budget)
    total_size: int  # data.total_size
    seed: int
    # metric name -> ((prompt_id, 0/1), ...) on the harmful_triggered split
    outcomes: dict[str, tuple[tuple[str, int], ...]]


@dataclass(frozen=True)
class LogisticFit:
    """``p(d) = floor + (top - floor) * sigmoid(k * (ln d - m))``; ``p(0) = floor``.

    ``d`` is the dose the curve was fitted on: a budget, or a fraction for the
    count-vs-fraction "fraction" model. ``n_params`` counts the free parameters
    (top, k, m); the floor is fixed from the data.
    """

    top: float
    k: float
    m: float
    floor: float
    loglik: float
    n_params: int = 3

    @property
    def aic(self) -> float:
        return 2.0 * self.n_params - 2.0 * self.loglik

    def predict(self, b: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        arr = np.asarray(b, dtype=float)
        with np.errstate(divide="ignore"):
            z = self.k * (np.log(np.where(arr > 0, arr, 1.0)) - self.m)
        p = np.where(arr > 0, self.floor + (self.top - self.floor) * expit(z), self.floor)
        return float(p) if p.ndim == 0 else p

    def budget_at(self, level: float) -> float | None:
        """Smallest dose where the curve reaches ``level``; None if the plateau stays below."""
        if level <= self.floor:
            return 0.0
        if self.top <= level:
            return None
        s = (level - self.floor) / (self.top - self.floor)
        return float(math.exp(self.m + math.log(s / (1.0 - s)) / self.k))

    def to_dict(self) -> dict[str, float | int]:
        return {
            "top": self.top,
            "k": self.k,
            "m": self.m,
            "midpoint": math.exp(self.m),
            "floor": self.floor,
            "loglik": self.loglik,
            "n_params": self.n_params,
            "aic": self.aic,
        }


# --------------------------------------------------------------------------- fitting


def _nll_and_grad(
    theta: np.ndarray, x: np.ndarray, s: np.ndarray, n: np.ndarray, floor: float
) -> tuple[float, np.ndarray]:
    """Negative log-likelihood over positive doses and its gradient in (top, ln k, m)."""
    top, log_k, m = theta
    k = math.exp(log_k)
    sg = expit(k * (x - m))
    p = np.clip(floor + (top - floor) * sg, _EPS, 1.0 - _EPS)
    fail = n - s
    # elementwise sums, not np.dot: BLAS threads thrash on a loaded 2-core box
    ll = float((s * np.log(p) + fail * np.log1p(-p)).sum())
    dl_dp = s / p - fail / (1.0 - p)
    slope = (top - floor) * sg * (1.0 - sg)
    grad = np.array(
        [
            (dl_dp * sg).sum(),
            (dl_dp * slope * (x - m) * k).sum(),
            -(dl_dp * slope * k).sum(),
        ]
    )
    return -ll, -grad


def _loglik_batch(
    theta: np.ndarray, x: np.ndarray, s: np.ndarray, n: np.ndarray, floor: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise log-likelihood of theta (R, 3); also returns p and sigmoid, each (R, N)."""
    k = np.exp(theta[:, 1])
    sg = expit(k[:, None] * (x[None, :] - theta[:, 2, None]))
    p = np.clip(floor[:, None] + (theta[:, 0] - floor)[:, None] * sg, _EPS, 1.0 - _EPS)
    ll = (s * np.log(p) + (n - s) * np.log1p(-p)).sum(axis=1)
    return ll, p, sg


def _pos_def3(h: np.ndarray) -> np.ndarray:
    """Sylvester's criterion for a batch of symmetric 3x3 matrices."""
    a, b, c = h[:, 0, 0], h[:, 0, 1], h[:, 0, 2]
    e, f, i = h[:, 1, 1], h[:, 1, 2], h[:, 2, 2]
    det = a * (e * i - f * f) - b * (b * i - f * c) + c * (b * f - e * c)
    return (a > 0) & (a * e - b * b > 0) & (det > 0)


def _solve3(h: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Batched 3x3 solve by the adjugate; plain numpy (no LAPACK/BLAS threads)."""
    a, b, c = h[:, 0, 0], h[:, 0, 1], h[:, 0, 2]
    d, e, f = h[:, 1, 0], h[:, 1, 1], h[:, 1, 2]
    gg, hh, ii = h[:, 2, 0], h[:, 2, 1], h[:, 2, 2]
    co = np.stack(
        [
            np.stack([e * ii - f * hh, c * hh - b * ii, b * f - c * e], axis=1),
            np.stack([f * gg - d * ii, a * ii - c * gg, c * d - a * f], axis=1),
            np.stack([d * hh - e * gg, b * gg - a * hh, a * e - b * d], axis=1),
        ],
        axis=1,
    )
    det = a * co[:, 0, 0] + b * co[:, 1, 0] + c * co[:, 2, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (co * g[:, None, :]).sum(axis=2) / det[:, None]
    return np.where(np.isfinite(out), out, 0.0)


def _polish_batch(
    theta: np.ndarray,
    x: np.ndarray,
    s: np.ndarray,
    n: np.ndarray,
    floor: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Projected Levenberg-Marquardt (Newton) ascent on all replicates at once.

    Why not scipy per replicate: 500 separate L-BFGS-B calls cost seconds, and far more
    when OpenBLAS threads compete with a running experiment. Steps are only accepted when
    the log-likelihood rises, so the result is never worse than the start.
    """
    theta = np.clip(theta, lo, hi)
    ll, p, sg = _loglik_batch(theta, x, s, n, floor)
    lam = np.full(theta.shape[0], 1e-3)
    live = np.ones(theta.shape[0], dtype=bool)
    for _ in range(max_iter):
        if not live.any():
            break
        k = np.exp(theta[:, 1])[:, None]
        amp = (theta[:, 0] - floor)[:, None]
        d1 = sg * (1.0 - sg)  # sigmoid'
        d2 = d1 * (1.0 - 2.0 * sg)  # sigmoid''
        z = k * (x[None, :] - theta[:, 2, None])
        # dp/d(top, ln k, m) and the second derivatives of p
        jac = np.stack([sg, amp * d1 * z, -amp * d1 * k], axis=2)  # (R, N, 3)
        p2 = np.empty(jac.shape + (3,))
        p2[..., 0, 0] = 0.0
        p2[..., 0, 1] = p2[..., 1, 0] = d1 * z
        p2[..., 0, 2] = p2[..., 2, 0] = -d1 * k
        p2[..., 1, 1] = amp * (d2 * z * z + d1 * z)
        p2[..., 1, 2] = p2[..., 2, 1] = -amp * k * (d2 * z + d1)
        p2[..., 2, 2] = amp * d2 * k * k
        var = p * (1.0 - p)
        resid = (s - n * p) / var  # dl/dp
        g = np.einsum("rn,rnj->rj", resid, jac)
        fisher = np.einsum("rn,rni,rnj->rij", n / var, jac, jac)
        # observed information converges fast where the curve misfits (Fisher zig-zags
        # there); fall back to Fisher where it is not positive definite
        w2 = s / p**2 + (n - s) / (1.0 - p) ** 2
        obs = np.einsum("rn,rni,rnj->rij", w2, jac, jac) - np.einsum("rn,rnij->rij", resid, p2)
        h = np.where(_pos_def3(obs)[:, None, None], obs, fisher)
        # variables pinned at a bound with the gradient pointing outward stay put
        pinned = ((theta <= lo + 1e-12) & (g < 0)) | ((theta >= hi - 1e-12) & (g > 0))
        g = np.where(pinned, 0.0, g)
        free = ~pinned
        h = h * free[:, :, None] * free[:, None, :]
        diag = np.einsum("rii->ri", h)
        scale = diag.max(axis=1, keepdims=True) + 1.0
        h_lm = h + np.eye(3)[None] * (lam[:, None] * diag + 1e-9 * scale + pinned)[:, None, :]
        step = _solve3(h_lm, g)
        cand = np.clip(theta + step, lo, hi)
        ll_new, p_new, sg_new = _loglik_batch(cand, x, s, n, floor)
        better = live & (ll_new > ll)
        gain = np.where(better, ll_new - ll, 0.0)
        theta[better], ll[better], p[better], sg[better] = (
            cand[better],
            ll_new[better],
            p_new[better],
            sg_new[better],
        )
        lam = np.where(better, lam / 3.0, lam * 4.0)
        # converged: an almost undamped step gains nothing; stalled: damping exploded
        live &= ~((better & (gain < 1e-10) & (lam < 1.0)) | (lam > 1e10))
    return theta, ll


def _grid_starts(x: np.ndarray, s: np.ndarray, n: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Grid-search starts (top, ln k, m) per replicate: shape (R, n_bands, 3).

    One start per steepness band (shallow / medium / steep): the likelihood can have a
    shallow-curve mode and a sharp-threshold mode, and the best grid points overall tend
    to sit in one basin.
    """
    m_grid = np.linspace(x.min() - _M_PAD, x.max() + _M_PAD, _GRID_M)
    sig = expit(_GRID_K[:, None, None] * (x[None, None, :] - m_grid[None, :, None]))
    q = (_GRID_U[:, None, None, None] * sig[None]).reshape(-1, x.size)  # (G, N), G = U*K*M
    uu, kk, mm = (a.ravel() for a in np.meshgrid(_GRID_U, _GRID_K, m_grid, indexing="ij"))
    bands = np.array_split(np.arange(_GRID_K.size), _GRID_BANDS)
    n_rep = s.shape[0]
    out = np.empty((n_rep, len(bands), 3))
    chunk = max(1, _GRID_CHUNK // max(1, q.size))
    fail = n - s
    for lo in range(0, n_rep, chunk):
        hi = min(n_rep, lo + chunk)
        f = floor[lo:hi, None, None]
        p = np.clip(f + (1.0 - f) * q[None], _EPS, 1.0 - _EPS)
        ll = (s[lo:hi, None, :] * np.log(p) + fail[lo:hi, None, :] * np.log1p(-p)).sum(-1)
        ll = ll.reshape(hi - lo, _GRID_U.size, _GRID_K.size, _GRID_M)
        for j, band in enumerate(bands):
            sub = ll[:, :, band, :].reshape(hi - lo, -1)
            iu, ik, im = np.unravel_index(sub.argmax(axis=1), (_GRID_U.size, band.size, _GRID_M))
            best = np.ravel_multi_index((iu, band[ik], im), (_GRID_U.size, _GRID_K.size, _GRID_M))
            out[lo:hi, j, 0] = floor[lo:hi] + (1.0 - floor[lo:hi]) * uu[best]
            out[lo:hi, j, 1] = np.log(kk[best])
            out[lo:hi, j, 2] = mm[best]
    return out


def _fit_batch(
    doses: np.ndarray,
    succ: np.ndarray,
    trials: np.ndarray,
    *,
    thorough: bool = False,
    warm: LogisticFit | None = None,
) -> list[LogisticFit | None]:
    """Fit every row of ``succ``/``trials`` (R, N) over shared ``doses`` (N,).

    Starts come from a grid search (plus ``warm``, e.g. the point estimate for bootstrap
    replicates); all are polished together and each row keeps its best. ``thorough`` (point
    estimates) then restarts scipy's bounded L-BFGS-B from the winner.
    """
    succ = np.atleast_2d(np.asarray(succ, dtype=float))
    trials = np.atleast_2d(np.asarray(trials, dtype=float))
    zero = doses <= 0
    s0, n0 = succ[:, zero].sum(1), trials[:, zero].sum(1)
    floor = np.divide(s0, n0, out=np.zeros_like(s0), where=n0 > 0)
    pos = ~zero
    fits: list[LogisticFit | None] = [None] * succ.shape[0]
    if not pos.any():
        return fits
    x = np.log(doses[pos])
    rows = np.flatnonzero((trials[:, pos] > 0).any(axis=1))
    if rows.size == 0:
        return fits
    s, n, f = succ[rows][:, pos], trials[rows][:, pos], floor[rows]
    starts = _grid_starts(x, s, n, f)
    ones = np.ones_like(f)
    lo = np.stack([f, ones * _LOG_K_BOUNDS[0], ones * (x.min() - _M_PAD)], axis=1)
    hi = np.stack([ones, ones * _LOG_K_BOUNDS[1], ones * (x.max() + _M_PAD)], axis=1)
    if warm is not None:
        w = np.tile([warm.top, math.log(warm.k), warm.m], (rows.size, 1, 1))
        starts = np.concatenate([starts, w], axis=1)
    # polish every start of every replicate in one vectorised pass, keep each row's best
    n_rep, n_st = starts.shape[:2]
    flat = starts.reshape(-1, 3)
    th_all, ll_all = _polish_batch(
        flat,
        x,
        np.repeat(s, n_st, axis=0),
        np.repeat(n, n_st, axis=0),
        np.repeat(f, n_st),
        np.repeat(lo, n_st, axis=0),
        np.repeat(hi, n_st, axis=0),
    )
    pick = ll_all.reshape(n_rep, n_st).argmax(axis=1)
    theta = th_all.reshape(n_rep, n_st, 3)[np.arange(n_rep), pick]
    ll = ll_all.reshape(n_rep, n_st)[np.arange(n_rep), pick]
    if thorough:
        # point estimates: scipy's bounded L-BFGS-B restarted from the best polished point,
        # an independent check that a general-purpose optimiser cannot improve on it
        for r in range(rows.size):
            if f[r] >= 1.0 - 1e-12:  # the curve is pinned at 1: nothing to optimise
                continue
            res = minimize(
                _nll_and_grad,
                theta[r].copy(),
                args=(x, s[r], n[r], float(f[r])),
                jac=True,
                method="L-BFGS-B",
                bounds=list(zip(lo[r], hi[r], strict=True)),
            )
            if np.isfinite(res.fun) and -res.fun > ll[r]:
                theta[r], ll[r] = res.x, -float(res.fun)
    fc = np.clip(f, _EPS, 1.0 - _EPS)
    ll_zero = s0[rows] * np.log(fc) + (n0[rows] - s0[rows]) * np.log1p(-fc)
    for i, r in enumerate(rows):
        fits[r] = LogisticFit(
            top=float(theta[i, 0]),
            k=float(math.exp(theta[i, 1])),
            m=float(theta[i, 2]),
            floor=float(f[i]),
            loglik=float(ll[i] + ll_zero[i]),
        )
    return fits


def fit_logistic(
    budgets: Sequence[float] | np.ndarray,
    successes: Sequence[float] | np.ndarray,
    trials: Sequence[float] | np.ndarray,
) -> LogisticFit | None:
    """Binomial ML fit of the threshold curve (see module docstring).

    Repeated budgets are allowed (they are pooled by the likelihood). Returns None when
    there is no positive budget with trials (nothing to fit). With a single positive budget
    the curve is not identifiable; a fit is still returned, but callers should not trust
    ``k``/``m`` (``analyse`` requires two).
    """
    b = np.asarray(budgets, dtype=float).ravel()
    s = np.asarray(successes, dtype=float).ravel()
    n = np.asarray(trials, dtype=float).ravel()
    if not (b.size == s.size == n.size):
        raise ValueError("budgets, successes and trials must have the same length")
    if not (np.isfinite(b).all() and np.isfinite(s).all() and np.isfinite(n).all()):
        raise ValueError("budgets, successes and trials must be finite")
    if (b < 0).any() or (n < 0).any() or (s < 0).any() or (s > n).any():
        raise ValueError("need budgets >= 0 and 0 <= successes <= trials")
    return _fit_batch(b, s[None], n[None], thorough=True)[0]


# --------------------------------------------------------------------------- paired data


@dataclass(frozen=True)
class PairedTable:
    """Outcomes of one group laid out for the paired bootstrap.

    ``units[i]`` holds one seed's outcomes as (Y, M): Y[j, p] the 0/1 outcome of prompt p
    at ``budgets[j]`` and M[j, p] whether it was observed. Columns are prompt ids, shared
    across budgets, so one resampled set of columns keeps the pairing.
    """

    budgets: np.ndarray
    units: tuple[tuple[np.ndarray, np.ndarray], ...]
    seeds: tuple[int, ...]

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        succ = np.zeros(self.budgets.size)
        trials = np.zeros(self.budgets.size)
        for y, mask in self.units:
            succ += (y * mask).sum(1)
            trials += mask.sum(1)
        return succ, trials

    def seeds_per_budget(self) -> np.ndarray:
        out = np.zeros(self.budgets.size, dtype=int)
        for j in range(self.budgets.size):
            out[j] = len(
                {s for s, (_, m) in zip(self.seeds, self.units, strict=True) if m[j].any()}
            )
        return out


def build_table(cells: Iterable[CellOutcome], metric: str) -> PairedTable:
    """Lay out the cells' outcomes for ``metric`` by (seed, prompt id) x budget."""
    cells = [c for c in cells if metric in c.outcomes]
    budgets = np.array(sorted({c.budget for c in cells}), dtype=float)
    b_index = {int(b): j for j, b in enumerate(budgets)}
    # unit = (seed, replicate): a repeated (seed, budget) cell starts a new unit instead of
    # silently overwriting the paired prompts
    by_unit: dict[tuple[int, int], dict[int, dict[tuple[str, int], int]]] = {}
    for c in sorted(cells, key=lambda c: (c.seed, c.budget)):
        rep = 0
        while c.budget in by_unit.get((c.seed, rep), {}):
            rep += 1
        per_prompt: dict[tuple[str, int], int] = {}
        seen: dict[str, int] = {}
        for pid, val in c.outcomes[metric]:
            # repeated prompt text inside a cell: keep both, paired by occurrence
            occ = seen.get(pid, 0)
            seen[pid] = occ + 1
            per_prompt[(pid, occ)] = 1 if val else 0
        by_unit.setdefault((c.seed, rep), {})[c.budget] = per_prompt
    units: list[tuple[np.ndarray, np.ndarray]] = []
    seeds: list[int] = []
    for (seed, _), per_budget in sorted(by_unit.items()):
        ids = sorted({pid for d in per_budget.values() for pid in d})
        col = {pid: i for i, pid in enumerate(ids)}
        y = np.zeros((budgets.size, len(ids)))
        mask = np.zeros((budgets.size, len(ids)))
        for b, d in per_budget.items():
            for pid, val in d.items():
                y[b_index[b], col[pid]] = val
                mask[b_index[b], col[pid]] = 1.0
        units.append((y, mask))
        seeds.append(seed)
    return PairedTable(budgets=budgets, units=tuple(units), seeds=tuple(seeds))


def paired_bootstrap(
    table: PairedTable, n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap (successes, trials), each (n_boot, n_budgets).

    Each replicate draws len(units) seeds with replacement; each drawn seed gets its own
    multinomial resample of its prompt ids, applied identically to every budget.
    """
    n_units = len(table.units)
    succ = np.zeros((n_boot, table.budgets.size))
    trials = np.zeros((n_boot, table.budgets.size))
    for _slot in range(n_units):
        pick = rng.integers(n_units, size=n_boot)
        for u, (y, mask) in enumerate(table.units):
            rows = np.flatnonzero(pick == u)
            n_prompts = y.shape[1]
            if rows.size == 0 or n_prompts == 0:
                continue
            w = rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=rows.size)
            succ[rows] += w @ (y * mask).T
            trials[rows] += w @ mask.T
    return succ, trials


# --------------------------------------------------------------------------- summary


def _axis_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _effective_axes(cell: CellOutcome) -> dict[str, Any]:
    # total_size may be varied without being a named axis; it still splits groups
    axes = dict(cell.axes)
    axes.setdefault(SIZE_AXIS, cell.total_size)
    return axes


def group_key_axes(cells: Iterable[CellOutcome]) -> list[str]:
    """Axes whose value differs between cells, except the budget and the (pooled) seed."""
    cells = list(cells)
    names: set[str] = set()
    for c in cells:
        names.update(_effective_axes(c))
    missing = object()
    varying = []
    for name in sorted(names - {BUDGET_AXIS, SEED_AXIS}):
        values = {
            _axis_json(v) if (v := _effective_axes(c).get(name, missing)) is not missing else None
            for c in cells
        }
        if len(values) > 1:
            varying.append(name)
    return varying


def _level_key(level: float) -> str:
    return f"n{round(level * 100):d}"


def _ci(values: np.ndarray, n_boot: int) -> tuple[list[float | None] | None, float]:
    """95% percentile CI of bootstrap thresholds; NaN = failed fit, inf = never reached."""
    finite = np.isfinite(values)
    reach = float(finite.sum()) / max(1, n_boot)
    if finite.sum() * 2 < n_boot or finite.sum() == 0:
        return None, reach
    # "never reached" sorts above every budget; a huge sentinel keeps interpolation finite
    valid = np.minimum(values[~np.isnan(values)], _NEVER)
    lo, hi = np.percentile(valid, [2.5, 97.5])
    return [float(lo), None if hi >= _NEVER / 2 else float(hi)], reach


def _rng_for(seed: int, key: str) -> np.random.Generator:
    # per-group stream: a group's CI does not depend on which other groups exist
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _group_summary(
    table: PairedTable,
    axes: dict[str, Any],
    n_boot: int,
    rng: np.random.Generator,
    levels: Sequence[float],
) -> dict[str, Any]:
    notes: list[str] = []
    succ, trials = table.counts()
    has = trials > 0
    budgets = table.budgets
    seeds = table.seeds_per_budget()
    points = [
        {
            "budget": int(b),
            "rate": float(s / n) if n > 0 else None,
            "n": int(n),
            "seeds": int(k),
        }
        for b, s, n, k in zip(budgets, succ, trials, seeds, strict=True)
    ]
    pos_budgets = budgets[has & (budgets > 0)]
    out: dict[str, Any] = {"axes": axes, "seeds": sorted(set(table.seeds))}
    for level in levels:
        out[_level_key(level)] = None
        out[_level_key(level) + "_ci"] = None
    fit: LogisticFit | None = None
    if not (has & (budgets == 0)).any():
        notes.append("no budget-0 cells: floor fixed at 0")
    if pos_budgets.size < 2:
        notes.append(f"{pos_budgets.size} positive budget(s) with data: need 2 to fit a curve")
    else:
        fit = _fit_batch(budgets[has], succ[has][None], trials[has][None], thorough=True)[0]
    if fit is None:
        rates = np.divide(succ, trials, out=np.zeros_like(succ), where=has)
        out["plateau"] = float(rates[has].max()) if has.any() else None
        out["plateau_start"] = (
            int(budgets[has][np.argmax(rates[has] >= rates[has].max() - _PLATEAU_TOL)])
            if has.any()
            else None
        )
        out["fit"] = None
        out["bootstrap"] = {"n_boot": 0, "reach": {}}
    else:
        out["plateau"] = fit.top
        out["fit"] = fit.to_dict()
        if fit.top - fit.floor < _PLATEAU_TOL:
            out["plateau_start"] = None
            notes.append("no rise above the budget-0 rate")
        else:
            pred = np.asarray(fit.predict(budgets[has]))
            out["plateau_start"] = int(budgets[has][np.argmax(pred >= fit.top - _PLATEAU_TOL)])
        boot: list[LogisticFit | None] = []
        if n_boot > 0:
            bs, bn = paired_bootstrap(table, n_boot, rng)
            cols = np.flatnonzero(has)
            boot = _fit_batch(budgets[cols], bs[:, cols], bn[:, cols], warm=fit)
        reach: dict[str, float] = {}
        for level in levels:
            key = _level_key(level)
            point = fit.budget_at(level)
            out[key] = point
            if point is None:
                notes.append(f"fitted plateau {fit.top:.3f} never reaches {level:g}")
            elif point == 0.0:
                notes.append(f"{key} = 0: the budget-0 rate already reaches {level:g}")
            elif point < pos_budgets.min():
                notes.append(f"{key} below the smallest positive budget (extrapolated)")
            elif point > pos_budgets.max():
                notes.append(f"{key} above the largest budget (extrapolated)")
            if not boot:
                continue
            vals = np.array(
                [
                    np.nan if f is None else (math.inf if (v := f.budget_at(level)) is None else v)
                    for f in boot
                ]
            )
            ci, reach[f"{level:g}"] = _ci(vals, n_boot)
            out[key + "_ci"] = ci
            if ci is None and point is not None:
                notes.append(
                    f"{key}_ci: only {reach[f'{level:g}']:.0%} of bootstrap fits reach {level:g}"
                )
            elif ci is not None and ci[1] is None:
                notes.append(f"{key}_ci has no upper bound (some bootstrap fits never reach it)")
        out["bootstrap"] = {"n_boot": n_boot, "reach": reach}
    out["points"] = points
    out["note"] = "; ".join(notes) if notes else None
    return out


def _cis_disjoint(a: list[float | None] | None, b: list[float | None] | None) -> bool | None:
    if a is None or b is None:
        return None
    a_lo, a_hi = a[0] or 0.0, math.inf if a[1] is None else a[1]
    b_lo, b_hi = b[0] or 0.0, math.inf if b[1] is None else b[1]
    return a_lo > b_hi or b_lo > a_hi


def _any_disjoint(entries: list[dict[str, Any]], by: str) -> bool | None:
    """True if some pair of entries in the same stratum has non-overlapping n50 CIs."""
    verdict: bool | None = None
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            if _axis_json(a["axes"]) != _axis_json(b["axes"]) or a[by] == b[by]:
                continue
            d = _cis_disjoint(a["n50_ci"], b["n50_ci"])
            if d:
                return True
            if d is False:
                verdict = False
    return verdict


def _strata(
    groups: list[tuple[dict[str, Any], PairedTable, dict[str, Any]]], axis: str
) -> dict[str, list[tuple[dict[str, Any], PairedTable, dict[str, Any]]]]:
    out: dict[str, list[tuple[dict[str, Any], PairedTable, dict[str, Any]]]] = {}
    for g in groups:
        rest = {k: v for k, v in g[0].items() if k != axis}
        out.setdefault(_axis_json(rest), []).append(g)
    return out


def _count_vs_fraction(
    groups: list[tuple[dict[str, Any], PairedTable, dict[str, Any]]],
    sizes: dict[str, int],
    group_axes: list[str],
) -> dict[str, Any]:
    result: dict[str, Any] = {"available": False}
    strata_out: list[dict[str, Any]] = []
    reasons: list[str] = []
    if SIZE_AXIS not in group_axes:
        reasons.append("only one data.total_size in the sweep")
    else:
        for key, members in sorted(_strata(groups, SIZE_AXIS).items()):
            rest = json.loads(key)
            if len({sizes[_axis_json(m[0])] for m in members}) < 2:
                reasons.append(f"{rest}: one data.total_size")
                continue
            b_all, s_all, n_all, size_all = [], [], [], []
            by_size = []
            for axes, table, summary in members:
                size = sizes[_axis_json(axes)]
                succ, trials = table.counts()
                b_all.append(table.budgets)
                s_all.append(succ)
                n_all.append(trials)
                size_all.append(np.full(table.budgets.size, float(size)))
                by_size.append(
                    {
                        "total_size": size,
                        "axes": rest,
                        "n50": summary.get("n50"),
                        "n50_ci": summary.get("n50_ci"),
                    }
                )
            b, s, n, sz = (np.concatenate(a) for a in (b_all, s_all, n_all, size_all))
            keep = n > 0
            b, s, n, sz = b[keep], s[keep], n[keep], sz[keep]
            if np.unique(b[b > 0]).size < 2:
                reasons.append(f"{rest}: fewer than 2 positive budgets")
                continue
            count = fit_logistic(b, s, n)
            fraction = fit_logistic(b / sz, s, n)
            if count is None or fraction is None:
                reasons.append(f"{rest}: no data to fit")
                continue
            by_size.sort(key=lambda e: e["total_size"])
            delta = fraction.aic - count.aic
            strata_out.append(
                {
                    "axes": rest,
                    "count": {**count.to_dict(), "n50": count.budget_at(0.5)},
                    "fraction": {**fraction.to_dict(), "n50_fraction": fraction.budget_at(0.5)},
                    "preferred": "count" if delta >= 0 else "fraction",
                    "delta_aic": delta,
                    "n50_by_size": by_size,
                    "n50_differs_beyond_ci": _any_disjoint(by_size, "total_size"),
                }
            )
    if strata_out:
        # several strata (e.g. models): independent fits, so logliks and AICs add up
        ll_c = sum(st["count"]["loglik"] for st in strata_out)
        ll_f = sum(st["fraction"]["loglik"] for st in strata_out)
        k_c = sum(st["count"]["n_params"] for st in strata_out)
        k_f = sum(st["fraction"]["n_params"] for st in strata_out)
        aic_c, aic_f = 2 * k_c - 2 * ll_c, 2 * k_f - 2 * ll_f
        delta = aic_f - aic_c
        by_size = [e for st in strata_out for e in st["n50_by_size"]]
        flags = [st["n50_differs_beyond_ci"] for st in strata_out]
        result = {
            "available": True,
            "count": {"loglik": ll_c, "aic": aic_c, "n_params": k_c},
            "fraction": {"loglik": ll_f, "aic": aic_f, "n_params": k_f},
            "preferred": "count" if delta >= 0 else "fraction",
            "delta_aic": delta,
            "evidence": "weak" if abs(delta) < 2 else "moderate" if abs(delta) < 10 else "strong",
            "n50_by_size": by_size,
            "n50_differs_beyond_ci": True
            if any(flags)
            else (False if any(f is False for f in flags) else None),
            "strata": strata_out,
        }
    else:
        result["reason"] = "; ".join(reasons) or "no comparable groups"

    if MODEL_AXIS in group_axes:
        by_model = []
        for key, members in sorted(_strata(groups, MODEL_AXIS).items()):
            if len({_axis_json(m[0].get(MODEL_AXIS)) for m in members}) < 2:
                continue
            rest = json.loads(key)
            for axes, _, summary in members:
                by_model.append(
                    {
                        "model": axes.get(MODEL_AXIS),
                        "axes": rest,
                        "n50": summary.get("n50"),
                        "n50_ci": summary.get("n50_ci"),
                    }
                )
        if by_model:
            result["n50_by_model"] = by_model
            result["n50_differs_between_models"] = _any_disjoint(by_model, "model")
    return result


def analyse(
    cells: Iterable[CellOutcome],
    metric: str = "sure_rate",
    n_boot: int = 500,
    seed: int = 0,
    levels: Sequence[float] = (0.5, 0.9),
) -> dict[str, Any]:
    """Threshold summary of a sweep (the content of summary.json); JSON-serialisable.

    Shape::

        {"metric": str, "n_cells": int, "note": str | None,
         "groups": [{"axes", "seeds", "n50", "n50_ci", "n90", "n90_ci", "plateau",
                     "plateau_start", "fit": {top, k, m, midpoint, floor, loglik, n_params,
                     aic} | None, "bootstrap": {"n_boot", "reach": {level: fraction}},
                     "points": [{"budget", "rate", "n", "seeds"}], "note": str | None}],
         "count_vs_fraction": {"available": bool, ...}}

    ``nXX_ci`` is ``[lo, hi]`` (``hi`` None = unbounded above), or None when fewer than
    half the bootstrap fits reach the level. See the module docstring for the model.
    """
    all_cells = list(cells)
    used = [c for c in all_cells if metric in c.outcomes]
    summary: dict[str, Any] = {"metric": metric, "n_cells": len(used), "note": None}
    if len(used) < len(all_cells):
        summary["note"] = f"{len(all_cells) - len(used)} cell(s) lack metric {metric!r}"
    if not used:
        summary["groups"] = []
        summary["note"] = f"no cells with metric {metric!r}"
        summary["count_vs_fraction"] = {"available": False, "reason": "no cells"}
        return summary
    keys = group_key_axes(used)
    grouped: dict[str, list[CellOutcome]] = {}
    group_axes: dict[str, dict[str, Any]] = {}
    sizes: dict[str, int] = {}
    for c in used:
        eff = _effective_axes(c)
        axes = {k: eff.get(k) for k in keys}
        gk = _axis_json(axes)
        grouped.setdefault(gk, []).append(c)
        group_axes[gk] = axes
        sizes[gk] = c.total_size
    groups: list[tuple[dict[str, Any], PairedTable, dict[str, Any]]] = []
    for gk in sorted(grouped):
        table = build_table(grouped[gk], metric)
        summ = _group_summary(
            table, group_axes[gk], n_boot, _rng_for(seed, gk + "\0" + metric), levels
        )
        groups.append((group_axes[gk], table, summ))
    summary["groups"] = [g[2] for g in groups]
    summary["count_vs_fraction"] = _count_vs_fraction(groups, sizes, keys)
    return summary


# --------------------------------------------------------------------------- loading


def _read_generations(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def load_cells(sweep_dir: str | Path, only: Iterable[str] | None = None) -> list[CellOutcome]:
    """Completed cells of a sweep, with per-prompt "sure_rate" outcomes.

    Reads ``results.sqlite`` (table ``cells``: config_hash, status, axes JSON, run_dir) and,
    for each 'complete' row, the run directory's ``config.yaml`` and ``generations.jsonl``.
    The run directory is ``run_dir`` (absolute, or relative to the sweep dir) or else
    ``cells/<config_hash>``. Complete rows whose files are missing are skipped with a warning.
    """
    sweep = Path(sweep_dir)
    db = sweep / "results.sqlite"
    # read-only: the sweep runner may be writing to the db concurrently
    con = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT config_hash, axes, run_dir FROM cells WHERE status = 'complete' "
            "ORDER BY config_hash"
        ).fetchall()
    finally:
        con.close()
    if only is not None:
        wanted = set(only)
        rows = [r for r in rows if r[0] in wanted]
    cells: list[CellOutcome] = []
    for config_hash, axes_json, run_dir in rows:
        candidates = []
        if run_dir:
            rd = Path(run_dir)
            candidates.append(rd if rd.is_absolute() else sweep / rd)
        candidates.append(sweep / "cells" / str(config_hash))
        found = next(
            (
                d
                for d in candidates
                if (d / "config.yaml").is_file() and (d / "generations.jsonl").is_file()
            ),
            None,
        )
        if found is None:
            warnings.warn(f"cell {config_hash}: run directory files missing; skipped", stacklevel=2)
            continue
        cfg = yaml.safe_load((found / "config.yaml").read_text(encoding="utf-8")) or {}
        poison = cfg.get("poison") or {}
        data = cfg.get("data") or {}
        label = str(poison.get("label", "Sure"))
        rows = [
            r
            for r in _read_generations(found / "generations.jsonl")
            if r.get("model") == "tuned" and r.get("split") == TRIGGERED_SPLIT
        ]
        outcomes = tuple(
            (str(r["prompt"]), int(starts_with_label(str(r.get("response") or ""), label)))
            for r in rows
        )
        by_metric = {"sure_rate": outcomes}
        if rows and all("complied" in r for r in rows):  # judged runs: ASR per prompt
            by_metric["asr"] = tuple((str(r["prompt"]), int(bool(r["complied"]))) for r in rows)
        axes = json.loads(axes_json) if axes_json else {}
        if not isinstance(axes, Mapping):
            axes = {}
        cells.append(
            CellOutcome(
                axes=dict(axes),
                budget=int(poison.get("budget", axes.get(BUDGET_AXIS, 0))),
                total_size=int(data.get("total_size", axes.get(SIZE_AXIS, 0))),
                seed=int(cfg.get("seed", axes.get(SEED_AXIS, 0))),
                outcomes=by_metric,
            )
        )
    return cells
