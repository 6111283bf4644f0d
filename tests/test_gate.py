import itertools

import pytest
import torch

from avalanche_sdlora import GumbelGate
from avalanche_sdlora.gate import (
    annealed_temperature,
    entropy_sparsity,
    gini_sparsity,
    gumbel_sparsemax,
)


def gate_with(logits: list[float]) -> GumbelGate:
    gate = GumbelGate()
    for value in logits:
        gate.logits[gate.add_adapter()].data.fill_(value)
    return gate


def test_gumbel_sparsemax_sums_to_one_with_exact_zeros():
    logits = torch.tensor([[3.0, 0.0, -1.0, 2.9], [0.0, 0.0, 0.0, 0.0]])
    beta = gumbel_sparsemax(logits, tau=0.5, noise=False)
    torch.testing.assert_close(beta.sum(dim=-1), torch.ones(2))
    assert beta[0, 1] == 0.0 and beta[0, 2] == 0.0
    assert beta[0, 0] > 0 and beta[0, 3] > 0
    torch.testing.assert_close(beta[1], torch.full((4,), 0.25))


def test_gumbel_sparsemax_is_reproducible_under_a_seeded_generator():
    logits = torch.zeros(5)
    first = gumbel_sparsemax(logits, 1.0, torch.Generator().manual_seed(7))
    second = gumbel_sparsemax(logits, 1.0, torch.Generator().manual_seed(7))
    other = gumbel_sparsemax(logits, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_minus_infinity_logits_are_never_selected():
    logits = torch.tensor([0.0, float("-inf"), 0.0]).expand(200, 3)
    beta = gumbel_sparsemax(logits, 5.0, torch.Generator().manual_seed(0))
    assert torch.all(beta[:, 1] == 0)
    torch.testing.assert_close(beta.sum(-1), torch.ones(200))


def test_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="tau must be > 0"):
        gumbel_sparsemax(torch.zeros(2), 0.0)


def test_selection_frequency_follows_the_logits():
    gate = gate_with([8.0, 0.0, 0.0])
    frequency = gate.get_selection_frequency(
        [0, 1, 2], tau=0.5, num_samples=200, generator=torch.Generator().manual_seed(0)
    )
    assert frequency.shape == (3,)
    assert frequency[0] == 1.0
    assert frequency[1] < 0.2 and frequency[2] < 0.2


def test_selection_frequency_order_follows_the_indices_and_pruned_get_zero():
    gate = gate_with([0.0, 0.0, 5.0])
    gate.prune([1])
    frequency = gate.get_selection_frequency([2, 1, 0], tau=1.0, num_samples=50)
    assert frequency[0] == 1.0
    assert frequency[1] == 0.0


def test_freeze_and_unfreeze_touch_exactly_the_given_indices():
    gate = gate_with([0.0] * 4)
    gate.freeze_alphas([1, 3])
    assert [a.requires_grad for a in gate.alphas] == [True, False, True, False]
    assert all(logit.requires_grad for logit in gate.logits)
    gate.unfreeze_alphas([3])
    assert [a.requires_grad for a in gate.alphas] == [True, False, True, True]
    gate.freeze_logits([0, 2])
    assert [logit.requires_grad for logit in gate.logits] == [False, True, False, True]
    gate.unfreeze_logits([0])
    assert [logit.requires_grad for logit in gate.logits] == [True, True, False, True]


def test_bad_indices_raise_and_change_nothing():
    gate = gate_with([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="out of range"):
        gate.freeze_alphas([0, 3])
    assert all(a.requires_grad for a in gate.alphas)
    with pytest.raises(TypeError, match="must be ints"):
        gate.freeze_logits(["0"])
    gate.prune([1])
    with pytest.raises(ValueError, match="adapter 1 is pruned"):
        gate.unfreeze_alphas([0, 1])
    with pytest.raises(ValueError, match="adapter 1 is pruned"):
        gate.prune([1])
    with pytest.raises(ValueError, match="no active adapter"):
        gate.prune([0, 2])
    assert gate.active_indices == [0, 2]


def test_training_forward_samples_and_eval_forward_is_deterministic():
    gate = gate_with([1.0, 0.0, -1.0])
    gate.tau = 5.0
    samples = {tuple(gate(torch.Generator().manual_seed(s)).tolist()) for s in range(5)}
    assert len(samples) > 1
    gate.eval()
    expected = gumbel_sparsemax(torch.tensor([1.0, 0.0, -1.0]), 0.5, noise=False)
    torch.testing.assert_close(gate(), expected)
    torch.testing.assert_close(gate(), gate())


def test_temperature_schedule():
    assert annealed_temperature(0, 5.0, 0.5, 0.999) == pytest.approx(5.0)
    assert annealed_temperature(1000, 5.0, 0.5, 0.999) == pytest.approx(0.5 + 4.5 * 0.999**1000)
    taus = [annealed_temperature(s, 5.0, 0.5, 0.99) for s in range(0, 3000, 100)]
    assert all(a > b for a, b in itertools.pairwise(taus))
    assert taus[-1] == pytest.approx(0.5, abs=1e-3)


def test_sparsity_regularisers():
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    uniform = torch.full((4,), 0.25)
    assert gini_sparsity(one_hot) == 0.0
    assert entropy_sparsity(one_hot) == 0.0
    assert gini_sparsity(uniform).item() == pytest.approx(0.75)
    assert entropy_sparsity(uniform).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
