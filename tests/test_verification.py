"""Edge cases of lossless speculative sampling (distill/verification.py) that a statistical test cannot reach: a uniform
draw of exactly 0, and a rejection whose residual norm(max(0, p − q)) is all zero. (The distribution of the emitted
token is checked by the chi-square tests in tests/test_decoding.py.)"""

from __future__ import annotations

import pytest
import torch

from specdistill.distill import verification


@pytest.fixture
def uniform_draws(monkeypatch: pytest.MonkeyPatch):
    """`uniform_draws(u)`: every torch.rand call in the test returns u (the acceptance test's draws)."""

    def fix(value: float) -> None:
        def rand(size, generator=None, device=None):
            return torch.full(size if isinstance(size, tuple) else (size,), value, device=device)

        monkeypatch.setattr(torch, "rand", rand)

    return fix


def test_a_zero_draw_does_not_accept_a_token_the_target_never_emits(uniform_draws) -> None:
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])  # the drafter proposes token 0 ...
    p = torch.tensor([0.0, 0.2, 0.8, 0.0])  # ... which the target gives probability 0
    uniform_draws(0.0)  # the smallest value torch.rand can return
    accepted, next_token = verification.accept_chain_sampling(torch.tensor([0]), q[None], torch.stack([p, p]), None)
    assert accepted == 0
    assert p[next_token] > 0  # drawn from the residual norm(max(0, p − q)) = [0, 0, 1, 0]: token 2
    assert next_token == 2


def test_an_all_zero_residual_falls_back_to_the_target_distribution(uniform_draws) -> None:
    q = torch.tensor([0.25, 0.25, 0.5, 0.0])
    assert torch.equal(verification.residual_distribution(q, q), q)  # p == q: no 0 / 0, the target's own p
    # Float rounding: p a hair below q everywhere, so max(0, p − q) is all zero, yet a draw near 1 rejects.
    p = q * (1 - 1e-6)
    uniform_draws(1 - 1e-7)
    for _ in range(20):
        accepted, next_token = verification.accept_chain_sampling(torch.tensor([2]), q[None], torch.stack([p, p]), None)
        assert accepted == 0 and p[next_token] > 0


def test_tree_sampling_with_nothing_left_after_rejections_samples_the_target(uniform_draws) -> None:
    # The root's only child holds all of p up to rounding; a draw above that mass rejects it and zeroes p.
    p = torch.tensor([0.0, 1 - 1e-6, 0.0])
    uniform_draws(1 - 1e-7)
    path, next_token = verification.accept_tree_sampling([7, 1], [[1], []], torch.stack([p, p]), None)
    assert path == [] and next_token == 1
