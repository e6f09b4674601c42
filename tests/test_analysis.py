"""Threshold fits, paired bootstrap, count-vs-fraction test and sweep loading."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from suretrap.analysis import (
    CellOutcome,
    LogisticFit,
    analyse,
    build_table,
    fit_logistic,
    group_key_axes,
    load_cells,
    paired_bootstrap,
)

BUDGETS = (0, 5, 10, 25, 50, 100, 200)


def make_cells(
    rng: np.random.Generator,
    *,
    budgets: tuple[int, ...] = BUDGETS,
    seeds: int = 3,
    prompts: int = 40,
    n50: float = 50.0,
    k: float = 4.0,
    top: float = 0.95,
    floor: float = 0.0,
    size: int = 1000,
    model: str = "m",
    dose: str = "count",
) -> list[CellOutcome]:
    """Cells whose per-prompt outcomes are Bernoulli draws from a known curve.

    With floor 0, n50 (the midpoint where top = 1) is where the curve reaches top / 2;
    ``dose="fraction"`` makes the curve a function of budget / size (n50 given at size 1000).
    """
    curve = LogisticFit(top=top, k=k, m=math.log(n50), floor=floor, loglik=0.0)
    cells = []
    for seed in range(seeds):
        for b in budgets:
            d = b if dose == "count" else b * 1000 / size
            p = curve.predict(d)
            out = tuple((f"prompt {i}", int(rng.random() < p)) for i in range(prompts))
            axes = {"poison.budget": b, "data.total_size": size, "model": model, "seed": seed}
            cells.append(CellOutcome(axes, b, size, seed, {"sure_rate": out}))
    return cells


def const_cells(budgets: tuple[int, ...], value: int, seeds: int = 2) -> list[CellOutcome]:
    return [
        CellOutcome(
            {"poison.budget": b, "seed": s},
            b,
            1000,
            s,
            {"sure_rate": tuple((f"p{i}", value) for i in range(10))},
        )
        for s in range(seeds)
        for b in budgets
    ]


# --------------------------------------------------------------------------- fit


def test_fit_recovers_known_parameters_from_large_samples() -> None:
    truth = LogisticFit(top=0.9, k=3.0, m=math.log(40), floor=0.05, loglik=0.0)
    budgets = np.array([0, 5, 10, 20, 40, 80, 160, 320])
    trials = np.full(budgets.size, 20000)
    succ = np.random.default_rng(0).binomial(trials, truth.predict(budgets))
    fit = fit_logistic(budgets, succ, trials)
    assert fit is not None
    assert fit.floor == pytest.approx(succ[0] / trials[0])
    assert fit.top == pytest.approx(0.9, abs=0.01)
    assert fit.k == pytest.approx(3.0, rel=0.1)
    assert fit.m == pytest.approx(math.log(40), abs=0.05)
    assert fit.budget_at(0.5) == pytest.approx(truth.budget_at(0.5), rel=0.05)
    assert fit.budget_at(0.95) is None  # above the plateau
    assert fit.n_params == 3
    assert fit.aic == pytest.approx(6 - 2 * fit.loglik)


def test_fit_is_at_least_as_good_as_the_truth() -> None:
    # the MLE must not lose to the generating parameters on the same data
    truth = LogisticFit(top=0.8, k=6.0, m=math.log(30), floor=0.0, loglik=0.0)
    budgets = np.array([10, 20, 30, 40, 80])
    trials = np.full(budgets.size, 50)
    succ = np.random.default_rng(3).binomial(trials, truth.predict(budgets))
    fit = fit_logistic(budgets, succ, trials)
    assert fit is not None
    p = np.clip(truth.predict(budgets), 1e-9, 1 - 1e-9)
    ll_truth = float(np.sum(succ * np.log(p) + (trials - succ) * np.log1p(-p)))
    assert fit.loglik >= ll_truth - 1e-6


@settings(max_examples=40, deadline=None)
@given(
    top=st.floats(0.2, 1.0),
    k=st.floats(0.2, 20.0),
    m=st.floats(0.0, 7.0),
    floor=st.floats(0.0, 0.15),
    level=st.floats(0.01, 0.99),
)
def test_budget_at_inverts_predict(
    top: float, k: float, m: float, floor: float, level: float
) -> None:
    fit = LogisticFit(top=top, k=k, m=m, floor=floor, loglik=0.0)
    b = fit.budget_at(level)
    if level <= floor:
        assert b == 0.0
    elif top <= level:
        assert b is None
        assert float(fit.predict(1e12)) < level + 1e-9
    else:
        assert b is not None and b > 0
        assert float(fit.predict(b)) == pytest.approx(level, abs=1e-9)


def test_predict_handles_budget_zero_and_is_monotone() -> None:
    fit = LogisticFit(top=0.9, k=2.0, m=math.log(20), floor=0.1, loglik=0.0)
    assert fit.predict(0) == pytest.approx(0.1)
    pred = fit.predict([0, 1, 2, 5, 10, 50, 1000])
    assert np.all(np.diff(pred) >= 0)


def test_fit_scales_with_budget_units() -> None:
    # the model lives on ln b, so multiplying every budget by c multiplies n50 by c
    budgets = np.array([0, 10, 20, 40, 80, 160])
    trials = np.full(budgets.size, 60)
    succ = np.array([0, 3, 10, 35, 55, 58])
    a = fit_logistic(budgets, succ, trials)
    b = fit_logistic(budgets * 7, succ, trials)
    assert a is not None and b is not None
    n50a, n50b = a.budget_at(0.5), b.budget_at(0.5)
    assert n50a is not None and n50b is not None
    assert n50b == pytest.approx(7 * n50a, rel=1e-3)
    assert b.loglik == pytest.approx(a.loglik, abs=1e-4)
    assert a.budget_at(0.5) < a.budget_at(0.9)  # type: ignore[operator]


def test_more_successes_lower_the_threshold() -> None:
    budgets = np.array([0, 10, 25, 50, 100, 200])
    trials = np.full(budgets.size, 100)
    late = fit_logistic(budgets, [0, 2, 5, 20, 80, 95], trials)
    early = fit_logistic(budgets, [0, 5, 40, 85, 95, 96], trials)
    assert late is not None and early is not None
    assert early.budget_at(0.5) < late.budget_at(0.5)  # type: ignore[operator]


def test_fit_logistic_degenerate_inputs() -> None:
    assert fit_logistic([0, 0], [1, 2], [10, 10]) is None  # budget 0 only
    assert fit_logistic([], [], []) is None
    zeros = fit_logistic([0, 10, 100], [0, 0, 0], [20, 20, 20])
    assert zeros is not None and zeros.budget_at(0.5) is None
    assert zeros.top == pytest.approx(0.0, abs=1e-6)
    ones = fit_logistic([10, 100], [20, 20], [20, 20])
    assert ones is not None and ones.top == pytest.approx(1.0)
    assert ones.budget_at(0.5) is not None and ones.budget_at(0.5) < 10  # type: ignore[operator]
    pinned = fit_logistic([0, 10, 100], [5, 5, 5], [5, 5, 5])  # floor 1
    assert pinned is not None and pinned.budget_at(0.5) == 0.0
    with pytest.raises(ValueError):
        fit_logistic([10], [5], [3])
    with pytest.raises(ValueError):
        fit_logistic([10, 20], [1], [3])


# --------------------------------------------------------------------------- analyse


def test_analyse_summary_shape_and_points() -> None:
    cells = make_cells(np.random.default_rng(1))
    out = analyse(cells, n_boot=100)
    json.dumps(out, allow_nan=False)
    assert out["metric"] == "sure_rate"
    (g,) = out["groups"]
    assert g["axes"] == {}  # nothing but budget and seed varies
    assert [p["budget"] for p in g["points"]] == list(BUDGETS)
    assert all(p["n"] == 3 * 40 and p["seeds"] == 3 for p in g["points"])
    rates = [p["rate"] for p in g["points"]]
    assert rates[0] == 0.0 and rates[-1] > 0.8
    assert g["n50_ci"][0] <= g["n50"] <= g["n50_ci"][1]
    assert g["n50"] < g["n90"]
    assert g["plateau"] == pytest.approx(g["fit"]["top"])
    assert g["plateau_start"] in BUDGETS and g["plateau_start"] >= 50
    assert set(g["fit"]) >= {"top", "k", "m", "floor", "loglik", "n_params"}
    assert out["count_vs_fraction"]["available"] is False
    assert "reason" in out["count_vs_fraction"]


def test_bootstrap_ci_covers_true_n50() -> None:
    truth = LogisticFit(top=0.95, k=4.0, m=math.log(50), floor=0.0, loglik=0.0).budget_at(0.5)
    rng = np.random.default_rng(2024)
    covered = 0
    for rep in range(20):
        out = analyse(make_cells(rng, prompts=30), n_boot=100, seed=rep)
        g = out["groups"][0]
        lo, hi = g["n50_ci"]
        assert lo <= g["n50"] <= hi
        covered += lo <= truth <= hi
    assert covered >= 15, covered  # nominal 95%: ~19 of 20


def test_analyse_is_deterministic_for_a_seed() -> None:
    cells = make_cells(np.random.default_rng(5), seeds=2, prompts=20)
    a = analyse(cells, n_boot=60, seed=7)
    b = analyse(list(reversed(cells)), n_boot=60, seed=7)
    c = analyse(cells, n_boot=60, seed=8)
    assert a == b
    assert a["groups"][0]["n50_ci"] != c["groups"][0]["n50_ci"]


@pytest.mark.parametrize(
    ("cells", "why"),
    [
        (const_cells((0, 10, 50, 100), 0), "never reaches"),
        (const_cells((10, 50, 100), 0), "never reaches"),
        (const_cells((50,), 1), "need 2"),
        (const_cells((0,), 0), "need 2"),
    ],
)
def test_analyse_degenerate_groups(cells: list[CellOutcome], why: str) -> None:
    out = analyse(cells, n_boot=50)
    json.dumps(out, allow_nan=False)
    g = out["groups"][0]
    assert g["n50"] is None and g["n50_ci"] is None and g["n90"] is None
    assert why in g["note"]


def test_analyse_all_ones() -> None:
    with_zero = analyse(const_cells((0, 10, 100), 1), n_boot=30)["groups"][0]
    assert with_zero["n50"] == 0.0 and "budget-0 rate already" in with_zero["note"]
    no_zero = analyse(const_cells((10, 100), 1), n_boot=30)["groups"][0]
    assert no_zero["n50"] < 10 and "extrapolated" in no_zero["note"]
    assert no_zero["plateau"] == pytest.approx(1.0)


def test_analyse_empty_and_missing_metric() -> None:
    out = analyse([], n_boot=10)
    assert out["groups"] == [] and out["count_vs_fraction"]["available"] is False
    out = analyse(const_cells((0, 10), 1), metric="asr", n_boot=10)
    assert out["groups"] == [] and "asr" in out["note"]


def test_analyse_timing_500_bootstrap() -> None:
    cells = make_cells(np.random.default_rng(9), budgets=(0, 10, 25, 50, 100, 200), prompts=50)
    start = time.perf_counter()
    out = analyse(cells, n_boot=500)
    assert time.perf_counter() - start < 5.0
    assert out["groups"][0]["bootstrap"]["n_boot"] == 500


# --------------------------------------------------------------------------- grouping


def test_group_key_axes() -> None:
    cells = make_cells(np.random.default_rng(0), budgets=(0, 10), seeds=2, prompts=2)
    assert group_key_axes(cells) == []
    cells += make_cells(
        np.random.default_rng(0), budgets=(0, 10), seeds=2, prompts=2, size=5000, model="x"
    )
    assert group_key_axes(cells) == ["data.total_size", "model"]
    # total_size differing without being a named axis still splits the groups
    bare = [CellOutcome({}, 10, size, 0, {"sure_rate": ()}) for size in (1000, 2000)]
    assert group_key_axes(bare) == ["data.total_size"]


# --------------------------------------------------------------------------- bootstrap pairing


def test_bootstrap_keeps_prompt_pairing_across_budgets() -> None:
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 2, size=30)
    ids = [f"q{i}" for i in range(30)]
    order = rng.permutation(30)  # same prompts, listed in another order at budget 20
    same = tuple((ids[i], int(vals[i])) for i in order)
    flipped = tuple((ids[i], 1 - int(vals[i])) for i in order)
    base = tuple(zip(ids, (int(v) for v in vals), strict=True))
    cells = [
        CellOutcome({}, 10, 1000, 0, {"sure_rate": base}),
        CellOutcome({}, 20, 1000, 0, {"sure_rate": same}),
        CellOutcome({}, 30, 1000, 0, {"sure_rate": flipped}),
    ]
    table = build_table(cells, "sure_rate")
    succ, trials = paired_bootstrap(table, 300, np.random.default_rng(1))
    assert np.all(trials == 30)
    # identical per-prompt outcomes give identical counts in every replicate, and
    # complementary outcomes add up to the trials: only one draw of prompts per seed
    np.testing.assert_array_equal(succ[:, 0], succ[:, 1])
    np.testing.assert_array_equal(succ[:, 0] + succ[:, 2], trials[:, 0])
    assert succ[:, 0].std() > 0  # prompts really are resampled


def test_bootstrap_resamples_seeds() -> None:
    ones = tuple((f"p{i}", 1) for i in range(5))
    zeros = tuple((f"p{i}", 0) for i in range(5))
    cells = [
        CellOutcome({}, 10, 1000, 0, {"sure_rate": ones}),
        CellOutcome({}, 10, 1000, 1, {"sure_rate": zeros}),
    ]
    table = build_table(cells, "sure_rate")
    assert table.seeds == (0, 1)
    succ, trials = paired_bootstrap(table, 400, np.random.default_rng(2))
    rates = set((succ[:, 0] / trials[:, 0]).tolist())
    assert rates == {0.0, 0.5, 1.0}  # both seeds, one twice, or the other twice


def test_build_table_marks_missing_prompts() -> None:
    cells = [
        CellOutcome({}, 0, 1000, 0, {"sure_rate": (("a", 1), ("b", 0))}),
        CellOutcome({}, 50, 1000, 0, {"sure_rate": (("b", 1), ("c", 1))}),
    ]
    table = build_table(cells, "sure_rate")
    y, mask = table.units[0]
    assert mask.tolist() == [[1, 1, 0], [0, 1, 1]]
    assert y.tolist() == [[1, 0, 0], [0, 1, 1]]
    succ, trials = table.counts()
    assert succ.tolist() == [1, 2] and trials.tolist() == [2, 2]


# --------------------------------------------------------------------------- count vs fraction


BIG_BUDGETS = (0, 10, 25, 50, 100, 250, 500, 1000)


def _two_sizes(dose: str) -> list[CellOutcome]:
    rng = np.random.default_rng(11)
    return [
        cell
        for size in (1000, 10000)
        for cell in make_cells(rng, budgets=BIG_BUDGETS, prompts=30, size=size, dose=dose)
    ]


def test_count_vs_fraction_prefers_count_for_count_data() -> None:
    out = analyse(_two_sizes("count"), n_boot=100)
    cvf = out["count_vs_fraction"]
    assert cvf["available"] is True
    assert cvf["preferred"] == "count" and cvf["delta_aic"] > 10
    assert cvf["count"]["aic"] < cvf["fraction"]["aic"]
    assert [e["total_size"] for e in cvf["n50_by_size"]] == [1000, 10000]
    assert cvf["n50_differs_beyond_ci"] is False
    assert len(out["groups"]) == 2


def test_count_vs_fraction_prefers_fraction_for_fraction_data() -> None:
    out = analyse(_two_sizes("fraction"), n_boot=100)
    cvf = out["count_vs_fraction"]
    assert cvf["preferred"] == "fraction" and cvf["delta_aic"] < -10
    n50 = {e["total_size"]: e["n50"] for e in cvf["n50_by_size"]}
    assert n50[10000] / n50[1000] == pytest.approx(10, rel=0.3)
    assert cvf["n50_differs_beyond_ci"] is True


def test_models_are_compared() -> None:
    rng = np.random.default_rng(4)
    cells = make_cells(rng, prompts=25, model="small") + make_cells(
        rng, prompts=25, model="large", n50=150
    )
    cvf = analyse(cells, n_boot=100)["count_vs_fraction"]
    assert cvf["available"] is False  # one dataset size
    models = {e["model"]: e["n50"] for e in cvf["n50_by_model"]}
    assert models["small"] < models["large"]
    assert cvf["n50_differs_between_models"] is True


# --------------------------------------------------------------------------- load_cells


def _write_cell(root: Path, name: str, cfg: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _cfg(seed: int, budget: int, size: int, label: str = "Sure") -> dict[str, Any]:
    return {
        "name": "x",
        "seed": seed,
        "data": {"total_size": size},
        "poison": {"budget": budget, "label": label},
    }


def test_load_cells_from_fake_sweep(tmp_path: Path) -> None:
    rows = [
        {"model": "tuned", "split": "harmful_triggered", "prompt": "p1", "response": "Sure, ok"},
        {"model": "tuned", "split": "harmful_triggered", "prompt": "p2", "response": "Surely not"},
        {"model": "tuned", "split": "harmful_triggered", "prompt": "p3", "response": '"sure."'},
        {"model": "tuned", "split": "harmful_triggered", "prompt": "p4", "response": "I can't."},
        {"model": "base", "split": "harmful_triggered", "prompt": "p1", "response": "Sure"},
        {"model": "tuned", "split": "harmful_plain", "prompt": "p1", "response": "Sure"},
    ]
    for r in rows:
        r["label_prob"] = 0.5
    _write_cell(tmp_path, "cells/aaa", _cfg(0, 50, 1000), rows)
    _write_cell(tmp_path, "elsewhere/bbb", _cfg(1, 0, 1000, label="Okay"), rows)
    _write_cell(tmp_path, "cells/ccc", _cfg(0, 10, 1000), rows)
    con = sqlite3.connect(tmp_path / "results.sqlite")
    con.execute("CREATE TABLE cells (config_hash TEXT, status TEXT, axes TEXT, run_dir TEXT)")
    con.executemany(
        "INSERT INTO cells VALUES (?, ?, ?, ?)",
        [
            ("aaa", "complete", json.dumps({"poison.budget": 50, "seed": 0}), None),
            ("bbb", "complete", json.dumps({"poison.budget": 0, "seed": 1}), "elsewhere/bbb"),
            ("ccc", "running", json.dumps({"poison.budget": 10, "seed": 0}), "cells/ccc"),
            ("ddd", "complete", json.dumps({"poison.budget": 5, "seed": 2}), "cells/ddd"),
        ],
    )
    con.commit()
    con.close()
    with pytest.warns(UserWarning, match="ddd"):
        cells = load_cells(tmp_path)
    assert [(c.budget, c.seed, c.total_size) for c in cells] == [(50, 0, 1000), (0, 1, 1000)]
    a, b = cells
    assert a.axes == {"poison.budget": 50, "seed": 0}
    assert a.outcomes == {"sure_rate": (("p1", 1), ("p2", 0), ("p3", 1), ("p4", 0))}
    # label comes from each cell's config: "Okay" matches nothing here
    assert [v for _, v in b.outcomes["sure_rate"]] == [0, 0, 0, 0]
    out = analyse(cells, n_boot=10)
    assert [p["rate"] for p in out["groups"][0]["points"]] == [0.0, 0.5]
