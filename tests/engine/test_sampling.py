"""Sampling as a pure function: exact expectations, and draws that follow the stated distribution."""
from __future__ import annotations

import math

import pytest
import torch

from amber.engine.sampling import (SamplingBatch, adjust_logits, make_generator, penalty_mask, sample,
                                   top_alternatives, top_p_filter)
from amber.engine.types import Category, Penalty

V = 6


def batch(temperature=0.0, top_p=1.0, scales=(0.0, 0.0, 0.0), masks=None, bias=None, banned=None, rows=1):
    return SamplingBatch(
        temperature=torch.full((rows,), float(temperature)), top_p=torch.full((rows,), float(top_p)),
        penalty_scales=torch.tensor([scales] * rows, dtype=torch.float32),
        penalty_masks=masks if masks is not None else torch.ones(rows, 3, V),
        bias=bias, banned=banned)


def test_penalties_follow_the_documented_formulas():
    logits = torch.zeros(1, V)
    counts = torch.tensor([[0., 1., 3., 0., 0., 0.]])
    lengths = torch.tensor([8])
    # presence 0.5 once per seen token; count 0.25 per occurrence; frequency 2.0 * n / L
    out = adjust_logits(logits, batch(scales=(0.5, 0.25, 2.0)), counts, lengths)
    expected = torch.tensor([[0., -(0.5 + 0.25 + 2 / 8), -(0.5 + 0.75 + 6 / 8), 0., 0., 0.]])
    torch.testing.assert_close(out, expected)


def test_a_false_apply_flag_exempts_that_category():
    cats = torch.zeros(5, V, dtype=torch.bool)
    cats[Category.WHITESPACE, 1] = True
    cats[Category.NUMBER, 2] = True
    p = Penalty(1.0, apply_to=(False, True, True, True, True))  # whitespace exempt
    mask = penalty_mask(p, cats)
    assert mask.tolist() == [1., 0., 1., 1., 1., 1.]
    masks = torch.stack([mask, torch.ones(V), torch.ones(V)]).unsqueeze(0)
    out = adjust_logits(torch.zeros(1, V), batch(scales=(1.0, 0, 0), masks=masks),
                        torch.tensor([[0., 2., 2., 0., 0., 0.]]), torch.tensor([4]))
    assert out.tolist() == [[0., 0., -1., 0., 0., 0.]]


def test_bias_and_bans():
    bias = torch.tensor([[0., 0., 0., 5., 0., 0.]])
    banned = torch.tensor([[0], [0]])  # (row, token) pairs: row 0 may not produce token 0
    out = adjust_logits(torch.zeros(1, V), batch(bias=bias, banned=banned), torch.zeros(1, V), torch.tensor([1]))
    assert out[0, 0] == float("-inf") and out[0, 3] == 5.0


def test_bans_are_row_token_pairs_and_leave_the_logits_untouched():
    logits = torch.arange(3 * V, dtype=torch.float32).view(3, V)
    banned = torch.tensor([[0, 0, 2], [1, 4, 1]])
    out = adjust_logits(logits, batch(banned=banned, rows=3), torch.zeros(3, V), torch.tensor([1, 1, 1]))
    want = logits.clone()
    want[0, 1] = want[0, 4] = want[2, 1] = float("-inf")
    assert torch.equal(out, want)
    assert torch.equal(logits, torch.arange(3 * V, dtype=torch.float32).view(3, V))


def test_greedy_picks_argmax_and_reports_the_adjusted_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, 0.5]])
    g = [make_generator(0, 0)]
    out = sample(logits, batch(temperature=0), torch.zeros(1, V), torch.tensor([1]), g)
    assert out.token_ids.tolist() == [1]
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1))
    torch.testing.assert_close(out.raw_logprobs, logits.log_softmax(-1))


def test_temperature_scales_the_reported_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, 0.5]])
    out = sample(logits, batch(temperature=0.5), torch.zeros(1, V), torch.tensor([1]), [make_generator(1, 0)])
    torch.testing.assert_close(out.logprobs, (logits / 0.5).log_softmax(-1))
    torch.testing.assert_close(out.raw_logprobs, logits.log_softmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    kept = top_p_filter(probs.log(), torch.tensor([0.79])).isfinite()
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = top_p_filter(probs.log(), torch.tensor([0.81])).isfinite()
    assert kept.tolist() == [[True, True, True, False, False]]
    kept = top_p_filter(probs.log(), torch.tensor([0.01])).isfinite()
    assert kept.tolist() == [[True, False, False, False, False]]
    assert top_p_filter(probs.log(), torch.tensor([1.0])).isfinite().all()
    kept = top_p_filter(probs.log(), torch.tensor([0.0])).isfinite()  # top_p 0: the most likely alone
    assert kept.tolist() == [[True, False, False, False, False]]


def test_top_p_zero_samples_the_most_likely_token_with_logprob_zero():
    """AI21's own suite sends temperature 1, topP 0 and expects greedy output."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, 0.5]]).repeat(4, 1)
    gens = [make_generator(i, 0) for i in range(4)]
    out = sample(logits, batch(temperature=1.0, top_p=0.0, rows=4), torch.zeros(4, V), torch.tensor([1] * 4), gens)
    assert out.token_ids.tolist() == [1, 1, 1, 1]
    assert out.logprobs[:, 1].tolist() == [0.0] * 4
    assert top_alternatives(out.logprobs, 3) == [((1, 0.0),)] * 4


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-6, 0.0])
def test_a_temperature_below_the_epsilon_is_greedy(temperature):
    """1e-38 overflowed (logits / t = inf): text went wrong and logprobs were NaN."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, 0.5]])
    out = sample(logits, batch(temperature=temperature, top_p=0.9), torch.zeros(1, V), torch.tensor([1]),
                 [make_generator(0, 0)])
    assert out.token_ids.tolist() == [1]
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1))
    assert out.logprobs.isfinite().all()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9)])
def test_draws_follow_the_stated_distribution(temperature, top_p):
    """Chi-square goodness of fit of 20,000 draws against an independently computed target."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -3.0]])
    # Independent reference in plain Python.
    weights = [math.exp(x / temperature) for x in logits[0].tolist()]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(V), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p and top_p < 1:
            break
        kept.add(i)
        mass += probs[i]
    target = [probs[i] / mass if i in kept else 0.0 for i in range(V)]
    n = 20_000
    counts = [0] * V
    g = make_generator(1234, 0)
    b = batch(temperature=temperature, top_p=top_p, rows=1)
    for _ in range(n):
        counts[int(sample(logits, b, torch.zeros(1, V), torch.tensor([1]), [g]).token_ids[0])] += 1
    for i in range(V):
        if target[i] == 0:
            assert counts[i] == 0, f"token {i} is outside the nucleus but was drawn"
    chi2 = sum((counts[i] - n * target[i]) ** 2 / (n * target[i]) for i in range(V) if target[i] > 0)
    dof = sum(t > 0 for t in target) - 1
    assert chi2 < {2: 13.8, 3: 16.3, 4: 18.5, 5: 20.5}[dof], (chi2, counts, target)  # p = 0.001


def test_seeded_generators_reproduce_and_rows_differ():
    logits = torch.zeros(2, 1000)
    b = batch(temperature=1.0, rows=2)
    b.penalty_masks = torch.ones(2, 3, 1000)
    gens = [make_generator(7, 0), make_generator(7, 1)]
    first = [sample(logits, b, torch.zeros(2, 1000), torch.tensor([1, 1]), gens).token_ids.tolist() for _ in range(5)]
    gens = [make_generator(7, 0), make_generator(7, 1)]
    again = [sample(logits, b, torch.zeros(2, 1000), torch.tensor([1, 1]), gens).token_ids.tolist() for _ in range(5)]
    assert first == again
    assert [r[0] for r in first] != [r[1] for r in first]


def test_top_alternatives_are_sorted_and_skip_impossible_tokens():
    lp = torch.tensor([[-1.0, float("-inf"), -0.5, -3.0]])
    assert top_alternatives(lp, 3) == [((2, -0.5), (0, -1.0), (3, -3.0))]
    assert top_alternatives(lp, 4) == [((2, -0.5), (0, -1.0), (3, -3.0))]
    assert top_alternatives(lp, 0) == [()]


def test_a_draw_at_the_very_top_of_the_distribution_takes_the_last_possible_token(monkeypatch):
    from amber.engine.sampling import draw
    logprobs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.0, 0.75, 0.0]]).log()
    # a uniform so close to 1 that u * total rounds to the total: past every token of the row
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0 - 2.0 ** -60, dtype=torch.float64))
    assert draw(logprobs, [torch.Generator(), torch.Generator()]).tolist() == [1, 2]


@pytest.mark.parametrize("vocab", [49152, 1000])  # whole blocks, and a padded last block
def test_the_two_level_inversion_picks_what_one_cumulative_sum_over_the_vocabulary_picks(vocab):
    """invert against the plain inverse CDF, written here: a float64 cumsum over every token and
    the first token past u * total. Rows with impossible tokens (-inf, and under the floor),
    whole blocks of them, and a row whose mass sits in one block."""
    from amber.engine.sampling import DRAW_FLOOR, invert
    g = torch.Generator().manual_seed(3)
    logprobs = (torch.randn(4, vocab, generator=g) * 4).log_softmax(-1)
    logprobs[1, 300:700] = float("-inf")
    logprobs[2, ::3] = -90.0  # under the floor: drawn as impossible
    logprobs[3] = float("-inf")
    logprobs[3, 260:270] = torch.randn(10, generator=g)
    logprobs = logprobs.log_softmax(-1)
    kept = torch.where(logprobs < DRAW_FLOOR, torch.zeros(()), logprobs.double().exp())
    cdf = kept.cumsum(-1)
    for _ in range(50):
        u = torch.rand(4, dtype=torch.float64, generator=g)
        want = [int(torch.searchsorted(cdf[r], u[r] * cdf[r, -1], right=True)) for r in range(4)]
        assert invert(logprobs, u).tolist() == want
    for r, token in enumerate(invert(logprobs, torch.full((4,), 1.0 - 2.0 ** -60, dtype=torch.float64)).tolist()):
        assert token == int(kept[r].nonzero().max())  # the top of the distribution: the last possible token
