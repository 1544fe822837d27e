"""Bradley–Terry: the closed form of two players, and strengths recovered from simulated votes."""

from __future__ import annotations

import numpy as np
import pytest

from difflab.web.ab import ABStore, bradley_terry


def test_two_players_match_the_closed_form_log_ratio_and_its_standard_error():
    wins = np.array([[0.0, 30.0], [10.0, 0.0]])
    theta, se = bradley_terry(wins, prior=0.0)
    assert theta[0] - theta[1] == pytest.approx(np.log(3.0), abs=1e-9)
    assert theta.sum() == pytest.approx(0.0, abs=1e-12)
    # Fisher information of the difference d: n p (1-p) with p = 3/4; each θ = ±d/2
    info = 40 * 0.75 * 0.25
    assert se[0] == pytest.approx(0.5 / np.sqrt(info), rel=1e-6)


def test_strengths_are_recovered_from_votes_drawn_with_known_strengths():
    rng = np.random.default_rng(0)
    true = np.log(np.array([1.0, 2.0, 4.0, 8.0]))
    wins = np.zeros((4, 4))
    for _ in range(6000):
        i, j = rng.choice(4, 2, replace=False)
        p = 1 / (1 + np.exp(-(true[i] - true[j])))
        if rng.random() < p:
            wins[i, j] += 1
        else:
            wins[j, i] += 1
    theta, se = bradley_terry(wins)
    assert list(np.argsort(theta)) == [0, 1, 2, 3]
    ratios = np.exp(np.diff(theta))
    assert ratios == pytest.approx([2.0, 2.0, 2.0], rel=0.15)
    centred = true - true.mean()
    assert np.all(np.abs(theta - centred) < 3 * se)  # the intervals cover the truth


def test_an_unbeaten_configuration_keeps_a_finite_score_under_the_prior():
    theta, se = bradley_terry(np.array([[0.0, 5.0], [0.0, 0.0]]))
    assert np.isfinite(theta).all() and np.isfinite(se).all() and theta[0] > theta[1]


def test_store_counts_ties_and_both_bad_as_half_wins(tmp_path):
    store = ABStore(tmp_path / "ab.sqlite")
    exp = store.add_experiment("x", {"steps": 2}, {"steps": 4}, {})
    winners = []
    for choice in ("left", "left", "right", "tie", "both_bad"):
        pair = store.add_pair(exp, 0, {}, b"a", b"b")
        winners.append(store.vote(pair["id"], choice)["winner"])
        assert store.pair_image(pair["id"], "left") == (b"a" if pair["a_left"] else b"b")
    a = winners.count("a") + 1.0  # tie + both-bad: half a win each way, twice
    b = winners.count("b") + 1.0
    ranking = store.ranking(prior=0.0)
    scores = {r["label"]: r["score"] for r in ranking["configs"]}
    assert scores["steps=2"] - scores["steps=4"] == pytest.approx(np.log(a / b), abs=1e-9)
    row = next(r for r in ranking["configs"] if r["label"] == "steps=2")
    assert row["ties"] == 1 and row["both_bad"] == 1 and row["votes"] == 5
    store.close()
