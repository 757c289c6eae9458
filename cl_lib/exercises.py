"""Self-checks for the exercises of the chapters.

Every check takes the reader's answer (a number, a boolean or a function) and prints its
verdict. It returns nothing, so that a notebook cell shows only the verdict. The verdict is
``right: ...``; or ``wrong, because ... hint: ...``, with a specific hint for the typical
mistakes; or ``not answered yet ...`` while the answer is still the placeholder ``None``, so
that a chapter runs from top to bottom before the reader has answered. The checks compute the
expected answer themselves and never print it.

Names follow the chapters: ``ch2_ex2`` checks Exercise 2 of Chapter 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "ch1_ex1",
    "ch1_ex2",
    "ch1_ex3",
    "ch1_ex4",
    "ch2_ex1",
    "ch2_ex2",
    "ch2_ex3",
    "ch3_ex1",
    "ch3_ex2",
    "ch3_ex3",
    "ch4_ex1",
    "ch4_ex2",
    "ch4_ex3",
    "ch5_ex1",
    "ch5_ex2",
    "ch6_ex1",
    "ch6_ex2",
    "smallest_batch_for_gap",
]

NOT_ANSWERED = "not answered yet: replace None by your answer and run this cell again."


def _verdict(ok: bool, right: str, why: str = "", hint: str = "") -> None:
    """Print 'right: ...' or 'wrong, because ... hint: ...'."""
    if ok:
        print(f"right: {right}")
    else:
        print(f"wrong, because {why}\nhint: {hint}")


def _not_answered() -> None:
    """Print the placeholder message."""
    print(NOT_ANSWERED)


def _number(answer: object) -> float | None:
    """The answer as a float, or None when it is not a real number."""
    if isinstance(answer, bool):
        return None
    try:
        value = float(answer)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _wrong_type(expected: str) -> None:
    """Report an answer of the wrong kind."""
    return _verdict(False, "", f"the answer is not {expected}.", f"give {expected}.")


def _call(function: object, *args: object) -> float | None:
    """Call the reader's function and return its value as a float (None if it fails)."""
    if not callable(function):
        return None
    try:
        value = function(*args)
    except Exception:  # the reader's code may raise anything; report it as wrong
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    return _number(value)


def _close(a: float, b: float, rel: float = 1e-6, abs_tol: float = 1e-9) -> None:
    """Whether two numbers agree within a relative or absolute tolerance."""
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol)


# Chapter 1 ------------------------------------------------------------------------------------


def ch1_ex1(gap: object) -> None:
    """Exercise 1.1: ``gap(K, tau)`` is LSE_tau(a) - max(a) for K equal scores."""
    if gap is None:
        return _not_answered()
    cases = [(2, 0.1), (7, 0.5), (50, 2.0)]
    for k, tau in cases:
        value = _call(gap, k, tau)
        if value is None:
            return _wrong_type("a function gap(K, tau) that returns a number")
        expected = tau * math.log(k)
        if not _close(value, expected):
            if _close(value, tau * math.log(k - 1)):
                hint = "all K terms of the sum are equal, the maximum included: count it too."
            elif _close(value, math.log(k)):
                hint = "LSE_tau carries the factor tau in front of the log."
            else:
                hint = "write sum_k exp(s / tau) = K exp(s / tau) and take tau log of it."
            return _verdict(False, "", f"gap({k}, {tau}) = {value:.4g} is not the gap.", hint)
    return _verdict(True, "the gap of K equal scores is the whole bound tau log K.")


def ch1_ex2(effective_temperature: object) -> None:
    """Exercise 1.2: ``effective_temperature(a, tau)`` of prototypes scaled by ``a``."""
    if effective_temperature is None:
        return _not_answered()
    for a, tau in [(0.5, 0.1), (0.3, 0.2), (2.0, 0.05)]:
        value = _call(effective_temperature, a, tau)
        if value is None:
            return _wrong_type("a function effective_temperature(a, tau) that returns a number")
        if not _close(value, tau / a):
            hint = (
                "the scaling goes the other way: LSE_tau(a s) = a LSE_{tau/a}(s)."
                if _close(value, tau * a)
                else "factor a out of every score <z, a mu_c> = a <z, mu_c> inside the LSE."
            )
            return _verdict(False, "", f"for a = {a}, tau = {tau} you gave {value:.4g}.", hint)
    return _verdict(True, "short prototypes (a < 1) act like a higher temperature tau / a.")


def ch1_ex3(prototype_norm: object) -> None:
    """Exercise 1.3: ``prototype_norm(z)`` from the similarity matrix of unit rows ``z``."""
    if prototype_norm is None:
        return _not_answered()
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(
        torch.randn(12, 3, generator=gen, dtype=torch.float64) + 0.8, dim=1
    )
    value = _call(prototype_norm, z)
    if value is None:
        return _wrong_type("a function prototype_norm(z) that returns one number")
    expected = z.mean(dim=0).norm().item()
    sim = z @ z.T
    if _close(value, expected):
        return _verdict(True, "||mean z||^2 is the mean of all pairwise cosines, self-pairs too.")
    n = len(z)
    if _close(value, expected**2):
        hint = "the mean similarity is the SQUARED norm: take its square root."
    elif _close(value, math.sqrt(((sim.sum() - n) / (n * (n - 1))).item())):
        hint = "keep the self-pairs <z_i, z_i> = 1: the sum runs over all n^2 pairs."
    else:
        hint = "expand ||(1/n) sum_i z_i||^2 = (1/n^2) sum_{i,j} <z_i, z_j>."
    return _verdict(False, "", f"on a test set of 12 unit vectors you gave {value:.4g}.", hint)


def ch1_ex4(net_factor: object) -> None:
    """Exercise 1.4: ``net_factor(lam)``: the gradients on all prototypes add up to it times z."""
    if net_factor is None:
        return _not_answered()
    for lam in (0.5, 1.0, 2.0, 3.5):
        value = _call(net_factor, lam)
        if value is None:
            return _wrong_type("a function net_factor(lam) that returns a number")
        if not _close(value, lam - 1.0):
            hint = (
                "check the sign: the attraction -<z, mu_y> contributes -z, the LSE +lam z."
                if _close(value, 1.0 - lam)
                else "d/dmu_c = (lam pi_c - 1[c = y]) z, and the pi_c add up to 1."
            )
            return _verdict(False, "", f"for lam = {lam} you gave {value:.4g}.", hint)
    return _verdict(True, "the net force is (lam - 1) z, zero only for the cross-entropy.")


# Chapter 2 ------------------------------------------------------------------------------------


def ch2_ex1(scale_factor: object) -> None:
    """Exercise 2.1: ``scale_factor(gap)``: NT-Xent's gradient over the derived loss's."""
    if scale_factor is None:
        return _not_answered()
    for gap in (0.01, 0.3, 2.0):
        value = _call(scale_factor, gap)
        if value is None:
            return _wrong_type("a function scale_factor(gap) that returns a number")
        if not _close(value, math.exp(-gap)):
            if _close(value, -math.expm1(-gap)):
                hint = "that is q_i, the positive's weight; the factor is 1 - q_i."
            elif _close(value, math.exp(gap)):
                hint = "the factor is below 1: NT-Xent's gradient is the smaller one."
            else:
                hint = "write 1 - q_i = S / (P + S) and gap = log(1 + P / S)."
            return _verdict(False, "", f"for gap = {gap} you gave {value:.4g}.", hint)
    return _verdict(True, "NT-Xent scales each anchor's gradient by exp(-gap_i) = 1 - q_i.")


def smallest_batch_for_gap(tau: float, tol: float) -> int:
    """Smallest N with log(1 + e^{2/tau} / (2N - 2)) <= tol (the NT-Xent gap bound)."""
    bound = math.exp(2 / tau) / math.expm1(tol)  # 2N - 2 >= bound
    n = math.ceil(bound / 2 + 1)
    while n > 2 and math.log1p(math.exp(2 / tau) / (2 * (n - 1) - 2)) <= tol:
        n -= 1  # guard against round-off in the ceiling
    while math.log1p(math.exp(2 / tau) / (2 * n - 2)) > tol:
        n += 1
    return n


def _check_batch(answer: object, tau: float, tol: float, label: str) -> None:
    """Shared check of 'the smallest N for which the gap bound is at most tol'."""
    if answer is None:
        return _not_answered()
    value = _number(answer)
    if value is None or value != int(value):
        return _wrong_type("a whole number of instances N")
    n, expected = int(value), smallest_batch_for_gap(tau, tol)

    def bound(m: int) -> float:
        return math.log1p(math.exp(2 / tau) / (2 * m - 2)) if m >= 2 else math.inf

    if n == expected:
        return _verdict(True, f"{label} N is the first batch size whose bound is <= {tol}.")
    if n < 2:
        return _verdict(False, "", "a batch needs at least two instances.", "N >= 2.")
    if n == expected - 1:
        return _verdict(
            False,
            "",
            f"at N = {n} the bound is {bound(n):.5f}, still above {tol}.",
            "off by one: after solving 2N - 2 >= e^(2/tau) / (e^tol - 1) for N, round UP "
            "(ceil), and do not drop the '- 2'.",
        )
    if n == expected + 1:
        return _verdict(
            False,
            "",
            f"N = {n - 1} already meets the condition, so {n} is not the smallest.",
            "off by one: the negatives are 2N - 2, not 2N; solve for N and round up once.",
        )
    if bound(n) > tol:
        return _verdict(
            False,
            "",
            f"at N = {n} the bound is {bound(n):.4f}, above {tol}.",
            "use the worst case: s_ip = 1 and every s_ik = -1, so the ratio is "
            "e^(2/tau) / (2N - 2); then log(1 + u) <= tol means u <= e^tol - 1.",
        )
    return _verdict(
        False,
        "",
        f"the bound at N = {n} is below {tol}, but a smaller N also works.",
        "find the smallest N: solve the inequality for N instead of trying large values.",
    )


def ch2_ex2(n: object) -> None:
    """Exercise 2.2: the smallest N with worst-case NT-Xent gap <= 0.01 at tau = 1."""
    return _check_batch(n, tau=1.0, tol=0.01, label="at tau = 1,")


def ch2_ex3(bias: object) -> None:
    """Exercise 2.3: the bias b_x of every instance under the 'perfect' augmentation."""
    if bias is None:
        return _not_answered()
    value = _number(bias)
    if value is None:
        return _wrong_type("a number (the bias, the same for every instance)")
    if abs(value) < 1e-9:
        return _verdict(True, "the surrogate is the class prototype, so b_x = 0 for every x.")
    shrink = math.exp(-(0.35**2) / 2)
    hint = (
        "that is the norm of the rotation's shrink factor; the bias is ||mu_y - m_x||."
        if _close(value, shrink, rel=1e-3)
        else "average the view first over x' in the class, then over the rotation: what is m_x?"
    )
    return _verdict(False, "", f"a bias of {value:.4g} means m_x differs from mu_y.", hint)


# Chapter 3 ------------------------------------------------------------------------------------


def ch3_ex1(ratio: object) -> None:
    """Exercise 3.1: the expected ratio of the variance terms at K = 4 and K = 16."""
    if ratio is None:
        return _not_answered()
    value = _number(ratio)
    if value is None:
        return _wrong_type("a number")
    if _close(value, 4.0):
        return _verdict(True, "the variance term tr Cov / K is 16 / 4 = 4 times larger at K = 4.")
    if _close(value, 2.0):
        hint = "that is the ratio of the standard deviations; the term is a variance, tr Cov / K."
    elif _close(value, 0.25):
        hint = "the ratio is K=4 over K=16: fewer views, larger variance."
    else:
        hint = "the mean of K i.i.d. views has covariance Cov / K."
    return _verdict(False, "", f"{value:.4g} is not the ratio of tr Cov / 4 to tr Cov / 16.", hint)


def ch3_ex2(collision_fraction: object) -> None:
    """Exercise 3.2: ``collision_fraction(counts)``: expected share of same-class negatives."""
    if collision_fraction is None:
        return _not_answered()
    for counts in ([5, 5], [30, 10, 3, 2], [100, 50, 25, 12, 6, 3]):
        value = _call(collision_fraction, list(counts))
        if value is None:
            return _wrong_type("a function collision_fraction(counts) that returns a number")
        n = sum(counts)
        expected = sum(c / n * (c - 1) / (n - 1) for c in counts)
        if not _close(value, expected, rel=1e-6):
            if _close(value, sum((c / n) ** 2 for c in counts)):
                hint = (
                    "sum_c pi_c^2 is the approximation for a large data set; the anchor's own "
                    "image is not among its negatives: (n_c - 1) / (n - 1)."
                )
            else:
                hint = "an anchor of class c (probability n_c / n) meets (n_c - 1) / (n - 1)."
            return _verdict(False, "", f"for counts {counts} you gave {value:.4g}.", hint)
    return _verdict(
        True, "the fraction depends only on the class counts, so debiased positives keep it."
    )


def _clamp_threshold(seed: int = 6) -> float:
    """Smallest tau_plus in steps of 0.01 at which the debiased loss's clamp binds."""
    gen = torch.Generator().manual_seed(seed)
    batch = torch.randn(2, 64, 16, generator=gen, dtype=torch.float64)
    z = torch.nn.functional.normalize(batch, dim=-1).reshape(-1, 16)
    s = z @ z.T / 0.5
    rows = torch.arange(128)
    own = (rows[:, None] % 64) == (rows[None, :] % 64)
    positive = s[rows, (rows + 64) % 128].exp()
    negatives = (s.exp() * ~own).sum(1)
    floor = 126 * math.exp(-1 / 0.5)
    for step in range(100):
        t = step / 100
        if bool(((negatives - t * 126 * positive) / (1 - t) < floor).any()):
            return t
    return 1.0


def ch3_ex3(tau_plus: object) -> None:
    """Exercise 3.3: the smallest tau_plus (steps of 0.01) at which the clamp binds."""
    if tau_plus is None:
        return _not_answered()
    value = _number(tau_plus)
    if value is None:
        return _wrong_type("a number between 0 and 1")
    expected = _clamp_threshold()
    if _close(value, expected, abs_tol=1e-9):
        return _verdict(True, "below this class prior every anchor's corrected mass stays valid.")
    if _close(value, expected - 0.01, abs_tol=1e-9):
        hint = "at this value no anchor is clamped yet: the clamp binds one step later."
    elif value > expected:
        hint = "the clamp binds for AT LEAST ONE anchor: take the first anchor that hits it."
    else:
        hint = "the clamp binds when (sum_neg - tau_plus M P) / (1 - tau_plus) < M e^(-1/tau)."
    return _verdict(False, "", f"at tau_plus = {value:.2f} the answer does not match.", hint)


# Chapter 4 ------------------------------------------------------------------------------------


def ch4_ex1(collapsed_loss: object) -> None:
    """Exercise 4.1: ``collapsed_loss(alpha, lam, tau, M)`` of a fully collapsed batch."""
    if collapsed_loss is None:
        return _not_answered()
    for alpha, lam, tau, m in [(1.0, 0.5, 0.2, 14), (2.0, 1.0, 0.5, 6), (1.0, 3.0, 0.1, 30)]:
        value = _call(collapsed_loss, alpha, lam, tau, m)
        if value is None:
            return _wrong_type("a function collapsed_loss(alpha, lam, tau, M) returning a number")
        expected = (lam - alpha) / tau + lam * math.log(m)
        if not _close(value, expected):
            if _close(value, -alpha / tau + lam * math.log(m)):
                hint = "collapsed negatives have s_ik = 1, not 0: each term is e^(1/tau)."
            elif _close(value, (lam - alpha) / tau + lam * math.log(m + 1)):
                hint = "the balanced loss leaves the positive out of the sum: M = 2N - 2 terms."
            else:
                hint = "every similarity is 1: -alpha/tau + lam log(M e^(1/tau))."
            return _verdict(False, "", f"for {(alpha, lam, tau, m)} you gave {value:.4g}.", hint)
    return _verdict(True, "collapse costs lam / tau more than orthogonal negatives.")


def ch4_ex2(sgd_ratio: object) -> None:
    """Exercise 4.2: ``|w(scale 4) - w(scale 1)| / |update at scale 1|`` for plain SGD."""
    if sgd_ratio is None:
        return _not_answered()
    value = _number(sgd_ratio)
    if value is None:
        return _wrong_type("a number")
    if _close(value, 3.0):
        return _verdict(True, "SGD's step is 4 times as long, so the two differ by 3 updates.")
    if _close(value, 4.0):
        hint = "the update at scale 4 is 4 times as long; the question asks for the DIFFERENCE."
    elif abs(value) < 1e-2:
        hint = "that is AdamW, which normalises the gradient; SGD's step is lr times g."
    else:
        hint = "scaling (alpha, lam) by 4 scales the loss, its gradient and SGD's step by 4."
    return _verdict(False, "", f"{value:.4g} is not the SGD ratio.", hint)


def ch4_ex3(share: object, num_classes: int = 10) -> None:
    """Exercise 4.3: expected share of the total weight of each class under 1/n_c weights."""
    if share is None:
        return _not_answered()
    value = _number(share)
    if value is None:
        return _wrong_type("a number (the share of one class)")
    if _close(value, 1 / num_classes, rel=1e-3):
        return _verdict(True, "inverse-frequency weights give every class the share 1/C.")
    return _verdict(
        False,
        "",
        f"{value:.4g} depends on the class; the weighted shares do not.",
        "E[count of class c] = N n_c / n times w_c proportional to 1 / n_c: the same for all c.",
    )


# Chapter 5 ------------------------------------------------------------------------------------


def ch5_ex1(n: object) -> None:
    """Exercise 5.1: the smallest N whose NT-Xent gap bound is below 0.01 at tau = 0.5."""
    return _check_batch(n, tau=0.5, tol=0.01, label="at tau = 0.5,")


def ch5_ex2(fraction: object, differences: Sequence[float]) -> None:
    """Exercise 5.2: the fraction of runs in which the linear probe on h beats the one on z.

    ``differences`` holds, per pooled run (unflagged, each configuration and seed once), the
    linear-probe accuracy on ``h`` minus that on ``z``.
    """
    if fraction is None:
        return _not_answered()
    value = _number(fraction)
    if value is None:
        return _wrong_type("a number between 0 and 1")
    diffs = torch.as_tensor(list(differences), dtype=torch.float64)
    expected = (diffs > 0).double().mean().item()
    if _close(value, expected, abs_tol=1e-9):
        return _verdict(True, "the answer matches the pooled runs of Experiments E, F and G.")
    if _close(value, 100 * expected, abs_tol=1e-6):
        hint = "give a fraction between 0 and 1, not a percentage."
    elif _close(value, 1 - expected, abs_tol=1e-9):
        hint = "count the runs in which h is HIGHER than z (h - z > 0)."
    else:
        hint = (
            "pool the unflagged runs of the three experiments, each configuration and seed "
            "once, and compare linear_acc_head to linear_acc."
        )
    return _verdict(False, "", f"{value:.4g} is not the fraction of those runs.", hint)


# Chapter 6 ------------------------------------------------------------------------------------


def ch6_ex1(identical: object) -> None:
    """Exercise 6.1: are the resumed run's weights and losses identical to the uninterrupted?"""
    if identical is None:
        return _not_answered()
    if not isinstance(identical, bool):
        return _wrong_type("True or False")
    if identical:
        return _verdict(True, "the checkpoint holds every state the run needs, RNGs included.")
    return _verdict(
        False,
        "",
        "on a CPU the resumed run is bit-identical to the uninterrupted one.",
        "the checkpoint stores model, optimiser, schedule AND random-number generator states.",
    )


def ch6_ex2(nearest_prototype_predict: object) -> None:
    """Exercise 6.2: ``nearest_prototype_predict(train, train_labels, test)`` returns labels."""
    if nearest_prototype_predict is None:
        return _not_answered()
    if not callable(nearest_prototype_predict):
        return _wrong_type("a function nearest_prototype_predict(train, train_labels, test)")
    train, labels, test, expected, unnormalised = _prototype_case()
    fn: Callable[..., object] = nearest_prototype_predict
    try:
        pred = torch.as_tensor(fn(train, labels, test))
    except Exception as error:  # the reader's code may raise anything; report it
        return _verdict(False, "", f"the function raised {error!r}.", "run it on small tensors.")
    if pred.shape != expected.shape:
        return _verdict(
            False,
            "",
            f"it returned shape {tuple(pred.shape)}, not one label per test row.",
            "take argmax over the classes (dim=1) of the test-by-prototype similarities.",
        )
    if torch.equal(pred.long(), expected):
        return _verdict(True, "each test row gets the class of its most cosine-similar prototype.")
    hint = (
        "normalise the features (and the prototypes) before the inner products: the score is "
        "a cosine, and long features would win otherwise."
        if torch.equal(pred.long(), unnormalised)
        else "mu_c = mean of the normalised training features of class c; predict argmax_c cos."
    )
    return _verdict(
        False, "", "some test rows get a class other than their nearest prototype's.", hint
    )


def _prototype_case() -> tuple[torch.Tensor, ...]:
    """A small case where normalising the features changes the nearest prototype."""
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], dtype=torch.float64)
    train = torch.cat([train, 20 * torch.tensor([[0.2, 1.0]], dtype=torch.float64)])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.35], [0.1, 1.0], [1.0, 0.1], [3.0, 2.5]], dtype=torch.float64)
    unit = torch.nn.functional.normalize
    mu = torch.stack([unit(train[labels == c], dim=1).mean(0) for c in (0, 1)])
    expected = (unit(test, dim=1) @ unit(mu, dim=1).T).argmax(1)
    raw_mu = torch.stack([train[labels == c].mean(0) for c in (0, 1)])
    unnormalised = (test @ raw_mu.T).argmax(1)
    return train, labels, test, expected, unnormalised
