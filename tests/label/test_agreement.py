"""Agreement statistics on examples worked out by hand, and on Krippendorff's published example."""

import pytest

from rlhfkit.label.agreement import (agreement_report, kendall_w, krippendorff_alpha, mid_ranks,
                                     pairwise_agreement)


def test_mid_ranks_share_tied_places():
    assert mid_ranks([1, 2, 3]) == [1, 2, 3]
    assert mid_ranks([1, 1, 3]) == [1.5, 1.5, 3]
    assert mid_ranks([1, 1, 2]) == [1.5, 1.5, 3]  # dense ranks mean the same order
    assert mid_ranks([2, 1, 2, 4]) == [2.5, 1, 2.5, 4]
    assert mid_ranks([1, 1, 1]) == [2, 2, 2]


def test_krippendorff_alpha_by_hand():
    # Two coders, units (1,1), (2,2), (1,2): coincidences o11 = o22 = 2, o12 = o21 = 1; n1 = n2 = 3, n = 6.
    # Nominal: alpha = 1 - (n-1) * (o12 + o21) / (2 n1 n2) = 1 - 5 * 2 / 18 = 4/9. With two values the interval
    # and ordinal metrics are multiples of the nominal one, so they give 4/9 too.
    units = [[1, 1], [2, 2], [1, 2]]
    for metric in ("nominal", "interval", "ordinal"):
        assert krippendorff_alpha(units, metric) == pytest.approx(4 / 9)
    # Units (1,3), (2,2): o13 = o31 = 1, o22 = 2; n1 = 1, n2 = 2, n3 = 1, n = 4. Interval: observed
    # 2 * (3-1)^2 = 8; expected 2 * (1*2*1 + 1*1*4 + 2*1*1) = 16; alpha = 1 - 3 * 8 / 16 = -0.5 (worse than chance).
    assert krippendorff_alpha([[1, 3], [2, 2]], "interval") == pytest.approx(-0.5)
    # A unit with one value is not pairable; no pairable unit, or no variation at all: undefined.
    assert krippendorff_alpha([[1, 1], [2, 2], [1, 2], [5]], "nominal") == pytest.approx(4 / 9)
    assert krippendorff_alpha([[1], [2]]) is None
    assert krippendorff_alpha([[2, 2], [2, 2]]) is None


def test_krippendorff_alpha_matches_the_published_example():
    """Krippendorff (2011), 'Computing Krippendorff's Alpha-Reliability', section C: 4 coders, 12 units with
    missing values; published alphas: nominal 0.743, ordinal 0.815, interval 0.849."""
    rows = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
            [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
            [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
            [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]
    units = [[v for v in column if v is not None] for column in zip(*rows)]
    assert round(krippendorff_alpha(units, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(units, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(units, "interval"), 3) == 0.849


def test_kendall_w_by_hand():
    assert kendall_w([[1, 2, 3], [1, 2, 3], [1, 2, 3]]) == pytest.approx(1.0)
    assert kendall_w([[1, 2, 3], [3, 2, 1]]) == pytest.approx(0.0)  # rank sums 4, 4, 4: S = 0
    # Rank sums 4, 6, 8 around 6: S = 8; W = 12 S / (m^2 (n^3 - n)) = 96 / 216 = 4/9.
    assert kendall_w([[1, 2, 3], [1, 3, 2], [2, 1, 3]]) == pytest.approx(4 / 9)
    # Ties: mid-ranks [1.5, 1.5, 3] and [1, 2, 3]: sums 2.5, 3.5, 6 around 4, S = 6.5; the tie (t = 2) adds
    # T = 2^3 - 2 = 6: W = 12 * 6.5 / (4 * 24 - 2 * 6) = 78 / 84.
    assert kendall_w([[1, 1, 3], [1, 2, 3]]) == pytest.approx(78 / 84)
    assert kendall_w([[1, 2]]) is None and kendall_w([[1], [1]]) is None
    assert kendall_w([[1, 1], [1, 1]]) is None  # everyone ties everything: undefined


def test_pairwise_agreement_by_hand():
    # a and b agree on (0,1) and (0,2), not on (1,2): 2/3. c ties 0 and 1, which a does not: 2/3 with ties as an
    # answer; on the comparisons where both chose, (0,2) and (1,2), they agree: 1.
    ab = pairwise_agreement([{"a": [1, 2, 3], "b": [1, 3, 2]}])
    assert ab["agreement"] == pytest.approx(2 / 3) and ab["comparisons"] == 3
    ac = pairwise_agreement([{"a": [1, 2, 3], "c": [1, 1, 2]}])
    assert ac["agreement"] == pytest.approx(2 / 3) and ac["strict_agreement"] == 1.0
    assert ac["strict_comparisons"] == 2
    assert pairwise_agreement([{"a": [1, 2]}])["agreement"] is None


def test_report_counts_only_items_ranked_by_several():
    report = agreement_report([{"a": [1, 2, 3]}, {"a": [1, 2, 3], "b": [1, 2, 3]}])
    assert report["items_ranked"] == 2 and report["items_ranked_by_several"] == 1
    assert report["pairwise_agreement"] == 1.0 and report["kendall_w_mean"] == pytest.approx(1.0)
    assert report["krippendorff_alpha_ordinal"] == pytest.approx(1.0)
    empty = agreement_report([{"a": [1, 2]}])
    assert empty["pairwise_agreement"] is None and empty["krippendorff_alpha_ordinal"] is None
    assert empty["kendall_w_mean"] is None
