"""The exercise self-checks: right answers pass, typical mistakes get their specific hint."""

import math

import pytest
import torch

from cl_lib import exercises as ex


def run(capsys, check, *args):
    """Run a check and return (whether it said right, its printed text)."""
    assert check(*args) is None  # a notebook cell shows the verdict only
    out = capsys.readouterr().out
    return out.startswith("right"), out


ALL_CHECKS = [
    (ex.ch1_ex1, ()), (ex.ch1_ex2, ()), (ex.ch1_ex3, ()), (ex.ch1_ex4, ()),
    (ex.ch2_ex1, ()), (ex.ch2_ex2, ()), (ex.ch2_ex3, ()),
    (ex.ch3_ex1, ()), (ex.ch3_ex2, ()), (ex.ch3_ex3, ()),
    (ex.ch4_ex1, ()), (ex.ch4_ex2, ()), (ex.ch4_ex3, ()),
    (ex.ch5_ex1, ()), (ex.ch5_ex2, ([1.0, -2.0],)),
    (ex.ch6_ex1, ()), (ex.ch6_ex2, ()),
]  # fmt: skip


@pytest.mark.parametrize(("check", "extra"), ALL_CHECKS)
def test_placeholder_says_not_answered(capsys, check, extra):
    result, out = run(capsys, check, None, *extra)
    assert result is False and out.startswith("not answered yet")


@pytest.mark.parametrize(("check", "extra"), ALL_CHECKS)
def test_garbage_is_wrong_without_raising(capsys, check, extra):
    result, out = run(capsys, check, "nonsense", *extra)
    assert result is False and out.startswith("wrong, because") and "hint:" in out


# (check, right answer, [(wrong answer, words the hint must contain), ...], extra arguments)
CASES = [
    (ex.ch1_ex1, lambda k, t: t * math.log(k),
     [(lambda k, t: t * math.log(k - 1), "maximum included"),
      (lambda k, t: math.log(k), "factor tau")], ()),
    (ex.ch1_ex2, lambda a, t: t / a, [(lambda a, t: t * a, "other way")], ()),
    (ex.ch1_ex3, lambda z: (z @ z.T).mean().sqrt(),
     [(lambda z: (z @ z.T).mean(), "SQUARED"),
      (lambda z: (((z @ z.T).sum() - len(z)) / (len(z) * (len(z) - 1))).sqrt(), "self-pairs")], ()),
    (ex.ch1_ex4, lambda lam: lam - 1, [(lambda lam: 1 - lam, "sign")], ()),
    (ex.ch2_ex1, lambda g: math.exp(-g),
     [(lambda g: 1 - math.exp(-g), "q_i"), (lambda g: math.exp(g), "below 1")], ()),
    (ex.ch2_ex2, 369,
     [(368, "off by one"), (370, "off by one"), (100, "worst case"), (5000, "smallest")], ()),
    (ex.ch2_ex3, 0.0, [(math.exp(-(0.35**2) / 2), "shrink"), (0.3, "average")], ()),
    (ex.ch3_ex1, 4, [(2, "standard deviations"), (0.25, "fewer views")], ()),
    (ex.ch3_ex2, lambda c: sum(n / sum(c) * (n - 1) / (sum(c) - 1) for n in c),
     [(lambda c: sum((n / sum(c)) ** 2 for n in c), "own image")], ()),
    (ex.ch3_ex3, 0.40, [(0.39, "one step later"), (0.6, "AT LEAST ONE")], ()),
    (ex.ch4_ex1, lambda a, lam, t, m: (lam - a) / t + lam * math.log(m),
     [(lambda a, lam, t, m: -a / t + lam * math.log(m), "s_ik = 1"),
      (lambda a, lam, t, m: (lam - a) / t + lam * math.log(m + 1), "leaves the positive out")], ()),
    (ex.ch4_ex2, 3.0, [(4.0, "DIFFERENCE"), (1e-7, "AdamW")], ()),
    (ex.ch4_ex3, 0.1, [(0.245, "same for all")], ()),
    (ex.ch5_ex1, 2718, [(2717, "off by one"), (2719, "off by one")], ()),
    (ex.ch5_ex2, 2 / 3, [(200 / 3, "percentage"), (1 / 3, "HIGHER")], ([1.0, 0.5, -0.2],)),
    (ex.ch6_ex1, True, [(False, "random-number generator")], ()),
]  # fmt: skip


@pytest.mark.parametrize(("check", "right", "wrongs", "extra"), CASES)
def test_right_and_wrong_answers(capsys, check, right, wrongs, extra):
    result, out = run(capsys, check, right, *extra)
    assert result is True and out.startswith("right"), out
    for wrong, words in wrongs:
        result, out = run(capsys, check, wrong, *extra)
        assert result is False and out.startswith("wrong, because"), out
        assert words in out.split("hint:")[1], out


def nearest_prototype(train, labels, test, normalise=True):
    """A reference nearest-prototype classifier (cosine when normalise)."""
    unit = torch.nn.functional.normalize if normalise else (lambda x, dim: x)
    mu = torch.stack([unit(train[labels == c], dim=1).mean(0) for c in labels.unique()])
    return (unit(test, dim=1) @ unit(mu, dim=1).T).argmax(1)


def test_ch6_ex2_function_answers(capsys):
    assert run(capsys, ex.ch6_ex2, nearest_prototype)[0] is True
    result, out = run(capsys, ex.ch6_ex2, lambda a, b, c: nearest_prototype(a, b, c, False))
    assert result is False and "normalise" in out
    result, out = run(capsys, ex.ch6_ex2, lambda a, b, c: torch.zeros(2))
    assert result is False and "shape" in out
    result, out = run(capsys, ex.ch6_ex2, lambda a, b, c: 1 / 0)
    assert result is False and "raised" in out


def test_checks_never_print_the_expected_number(capsys):
    # The self-checks must not give the answer away, even to a wrong answer.
    for check, answer, hidden in [(ex.ch2_ex2, 100, "369"), (ex.ch5_ex1, 10, "2718"),
                                  (ex.ch3_ex3, 0.9, "0.40")]:  # fmt: skip
        _, out = run(capsys, check, answer)
        assert hidden not in out


def test_smallest_batch_matches_the_bound():
    for tau, tol in [(1.0, 0.01), (0.5, 0.01), (0.2, 0.05), (2.0, 0.001)]:
        n = ex.smallest_batch_for_gap(tau, tol)
        assert math.log1p(math.exp(2 / tau) / (2 * n - 2)) <= tol
        assert math.log1p(math.exp(2 / tau) / (2 * n - 4)) > tol
