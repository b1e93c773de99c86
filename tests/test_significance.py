import itertools

import numpy as np
import pytest

from lco.retrieval import EvalSet, mean_scores, per_query_scores, score
from lco.significance import RESAMPLES, bootstrap_interval, compare_systems, holm, paired_test


def test_identical_systems_differ_by_zero_with_p_one():
    scores = [0.0, 0.2, 0.5, 1.0, 0.0, 0.3]
    assert paired_test(scores, scores, seed=0) == {"difference": 0.0, "p_value": 1.0}


def test_a_system_better_on_every_query_gets_the_exact_randomization_p():
    # n = 6 queries, 2^6 = 64 sign flips, all enumerated: only the identity reaches +0.1 and only the flip of
    # every sign reaches -0.1, so the two-sided p is 2 / 64
    base = np.array([0.1, 0.3, 0.0, 0.5, 0.2, 0.4])
    result = paired_test(base + 0.1, base, seed=0)
    assert result["difference"] == pytest.approx(0.1)
    assert result["p_value"] == pytest.approx(2 / 2**6)
    assert paired_test(base, base + 0.1, seed=1)["p_value"] == pytest.approx(2 / 2**6)  # two-sided, seed-free


def test_a_sampled_randomization_test_is_close_to_the_exact_one():
    # 16 queries: 2^16 = 65,536 sign flips, more than the 10,000 the test draws, so scipy samples (the path
    # of every real eval set of 14 or more queries). The exact p, every flip enumerated here, is 0.0524; the
    # sampled two-sided p (twice the smaller tail) has a standard deviation of 2 x sqrt(0.026 x 0.974 / 10^4)
    # = 0.0032, so 0.015 is over 4 of them
    differences = np.random.default_rng(6).normal(0.03, 0.1, 16)
    flips = np.array(list(itertools.product([1, -1], repeat=16)))  # (65536, 16)
    null = flips @ differences / 16  # the mean difference under every flip
    observed = differences.mean()
    exact = np.mean(np.abs(null) >= abs(observed) * (1 - 1e-9))
    assert 2**16 > RESAMPLES and exact == pytest.approx(0.0524, abs=1e-4)
    sampled = paired_test(differences, np.zeros(16), seed=0)["p_value"]
    assert sampled == pytest.approx(exact, abs=0.015)
    assert sampled * (RESAMPLES + 1) == pytest.approx(round(sampled * (RESAMPLES + 1)))  # k / 10001: sampled


def test_the_bootstrap_interval_is_the_95_percent_one_of_the_mean():
    # for 400 queries the bootstrap distribution of the mean is close to normal with the standard deviation
    # sd / sqrt(n) (sd with ddof 0, as resampling sees it): the 95% interval is 2 x 1.96 of those wide
    # (a 90% interval would be 1.645 / 1.96 = 0.84 of it, a 50% one 0.34)
    values = np.random.default_rng(1).random(400)
    low, high = bootstrap_interval(values, seed=0)
    assert high - low == pytest.approx(2 * 1.959964 * values.std() / np.sqrt(400), rel=0.05)
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.003)


def test_the_bootstrap_interval_of_a_constant_is_that_constant():
    assert bootstrap_interval([0.25] * 31, seed=0) == (0.25, 0.25)
    assert bootstrap_interval([0.7], seed=0) is None  # one query: nothing to resample


def test_the_bootstrap_interval_holds_the_mean_and_narrows_with_more_queries():
    values = np.random.default_rng(0).random(31)
    low, high = bootstrap_interval(values, seed=0)
    assert low < values.mean() < high
    assert bootstrap_interval(values, seed=0) == (low, high)  # seeded
    low4, high4 = bootstrap_interval(np.tile(values, 4), seed=0)
    # four times the queries with the same spread: the standard error, and the width, halve
    assert (high4 - low4) == pytest.approx((high - low) / 2, rel=0.1)


def test_holm_equals_the_hand_computed_adjustment():
    # sorted 0.01, 0.02, 0.03, 0.04 (m = 4): 4 x 0.01, 3 x 0.02, max(0.06, 2 x 0.03), max(0.06, 1 x 0.04)
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 0.04 x 1 raised to the 0.06 before it
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # 2 x 0.6 capped at 1


def test_compare_systems_adjusts_the_pairs_as_one_family():
    per_query = {"a": [0.5] * 6, "b": [0.4] * 6, "c": [0.5] * 6}
    comparisons = compare_systems(per_query, [("a", "b"), ("a", "c")], seed=0)
    assert [c["p_value"] for c in comparisons] == pytest.approx([0.0312, 1.0], abs=1e-4)
    assert [c["p_holm"] for c in comparisons] == pytest.approx([0.0625, 1.0], abs=1e-4)
    assert [c["significant"] for c in comparisons] == [False, False]
    assert comparisons[0]["difference"] == pytest.approx(0.1)


def test_per_query_scores_average_to_score():
    pages = {f"d{i}": {"image": b"", "text": "", "lang": "xx"} for i in range(1, 6)}
    queries = {"q1": {"text": "a", "lang": "en"}, "q2": {"text": "b", "lang": "en"}}
    evalset = EvalSet(pages, queries, {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}})
    run = {"q1": {"d4": 0.9, "d1": 0.8}}  # q2 left out: it scores 0
    per_query = per_query_scores(run, evalset)
    assert list(per_query) == ["q1", "q2"] and set(per_query["q2"].values()) == {0.0}
    assert per_query["q1"]["mrr@10"] == 0.5
    assert mean_scores(per_query) == score(run, evalset)
