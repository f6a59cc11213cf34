"""Traversal verification (`verification=traversal`; Block Verification on a chain) is lossless: at T > 0 the output
has the target's distribution, on the verifier alone and end to end, chain and tree, top-k and sampled children; four
planted bugs are each caught; greedy output equals plain decoding."""

from __future__ import annotations

import pytest
import torch

from specdistill.distill import verification
from specdistill.distill.decoding import Decoder, DecodingConfig
from specdistill.distill.drafters.token_lm import LMDrafting
from specdistill.distill.target import FrozenTarget
from tests.test_decoding import (assert_sampled_output_has_the_target_distribution, chi_square_test, plain_outputs,
                                 random_lm, untrained)

# A two-level problem over 4 tokens: the target's p at the root and after each first token, the drafter's q alike.
P_ROOT = torch.tensor([0.1, 0.4, 0.3, 0.2])
P_AFTER = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.2, 0.2, 0.5, 0.1], [0.05, 0.05, 0.1, 0.8], [0.25, 0.25, 0.25, 0.25]])
Q_ROOT = torch.tensor([0.3, 0.2, 0.4, 0.1])
Q_AFTER = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1], [0.3, 0.3, 0.2, 0.2], [0.1, 0.6, 0.2, 0.1]])
# q that gives some tokens no mass, as an EAGLE-3 draft vocabulary or a top-p cut does
Q_ROOT_SPARSE = torch.tensor([0.5, 0.0, 0.3, 0.2])
Q_AFTER_SPARSE = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0], [0.3, 0.0, 0.3, 0.4], [0.0, 0.9, 0.1, 0.0]])
EXACT_PAIRS = (P_ROOT[:, None] * P_AFTER).flatten()  # P(first, second) under the target


def two_level_counts(children_kind: str, draws: int) -> torch.Tensor:
    """Counts of the 16 (first, second) token pairs over `draws` verifications of a depth-2 tree: `chain` one sampled
    child per row, `top_k` the two most likely children of q (deterministic: no q passed), `sampled` two draws
    without replacement (`sampled_sparse`: from a q with zeros). A pair the verifier leaves unfinished is completed
    from the target."""
    generator = torch.Generator().manual_seed(0)
    q_root, q_after = (Q_ROOT_SPARSE, Q_AFTER_SPARSE) if children_kind == "sampled_sparse" else (Q_ROOT, Q_AFTER)
    width = 1 if children_kind == "chain" else 2

    def draft(q: torch.Tensor) -> list[int]:
        return q.topk(width).indices.tolist() if children_kind == "top_k" else \
            verification.without_replacement(q, width, generator)

    counts = torch.zeros(16)
    for _ in range(draws):
        tokens, children, rows, draft_probs = [9], [[]], [P_ROOT], {}
        if children_kind != "top_k":
            draft_probs[0] = q_root
        for first in draft(q_root):
            row = len(tokens)
            tokens.append(first), children.append([]), children[0].append(row), rows.append(P_AFTER[first])
            if children_kind != "top_k":
                draft_probs[row] = q_after[first]
            for second in draft(q_after[first]):
                children[row].append(len(tokens))
                tokens.append(second), children.append([]), rows.append(torch.full((4,), 0.25))
        path, next_token = verification.accept_tree_traversal(tokens, children, torch.stack(rows), draft_probs,
                                                              generator)
        emitted = [tokens[row] for row in path] + [next_token]
        if len(emitted) == 1:
            emitted.append(int(verification.sample(P_AFTER[emitted[0]], generator)))
        counts[emitted[0] * 4 + emitted[1]] += 1
    return counts


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("children_kind", ["chain", "top_k", "sampled", "sampled_sparse"])
def test_traversal_verification_keeps_the_target_distribution(children_kind):
    statistic, critical = chi_square_test(two_level_counts(children_kind, 10000), EXACT_PAIRS)
    assert statistic < critical, (statistic, critical)


def without_parent_weight(weight: float, p_token: float, q_token: float) -> float:
    return min(1.0, p_token / q_token)  # a token-level test: a leaf accepted whatever its ancestors' odds


def weight_kept(weight: float, p: torch.Tensor, drawn_from: torch.Tensor, outside: float = 0.0):
    return weight, *BLOCK_RESIDUAL(weight, p, drawn_from, outside)[1:]


def residual_from_p(weight: float, p: torch.Tensor, drawn_from: torch.Tensor, outside: float = 0.0):
    return BLOCK_RESIDUAL(1.0, p, drawn_from, outside)  # forgets the row's path weight


def outside_dropped(weight: float, p: torch.Tensor, drawn_from: torch.Tensor, outside: float = 0.0):
    return BLOCK_RESIDUAL(weight, p, drawn_from)  # the residual's mass off the drawn tokens' support forgotten


BLOCK_RESIDUAL = verification.block_residual


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("planted_bug, children_kind, draws", [
    (("path_weight", without_parent_weight), "sampled", 4000),
    (("block_residual", weight_kept), "sampled", 4000),
    (("block_residual", residual_from_p), "sampled", 4000),
    (("block_residual", outside_dropped), "top_k", 4000),  # top-k children: a row's support is its children's tokens
    (("without_draw", lambda q, token: q), "sampled", 20000),  # the next sibling checked against q with the rejected
    # draw in it
], ids=["token-level weight", "parent weight kept", "residual from p", "mass off the support dropped",
        "q keeps the rejected draw"])
def test_traversal_check_catches_a_planted_bug(monkeypatch, planted_bug, children_kind, draws):
    monkeypatch.setattr(verification, *planted_bug)
    statistic, critical = chi_square_test(two_level_counts(children_kind, draws), EXACT_PAIRS)
    assert statistic > critical, (statistic, critical)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("config", [
    pytest.param(DecodingConfig(method="chain", gamma=2, temperature=0.7, top_p=0.8, max_new_tokens=3,
                                verification="traversal"), marks=pytest.mark.slow),
    pytest.param(DecodingConfig(method="chain", gamma=2, temperature=1.0, max_new_tokens=3, verification="traversal"),
                 marks=pytest.mark.slow),
    pytest.param(DecodingConfig(method="tree", tree_depth=2, tree_top_k=2, tree_total_tokens=5, temperature=1.0,
                                max_new_tokens=3, verification="traversal"), marks=pytest.mark.slow),
    pytest.param(DecodingConfig(method="tree", tree_depth=2, tree_top_k=2, tree_total_tokens=5, temperature=0.7,
                                top_p=0.8, max_new_tokens=3, verification="traversal"), marks=pytest.mark.slow),
    pytest.param(DecodingConfig(method="tree", tree_candidates="sampled_distinct", tree_depth=2, tree_top_k=2,
                                tree_total_tokens=5, temperature=1.0, max_new_tokens=3, verification="traversal"),
                 marks=pytest.mark.slow),
    pytest.param(DecodingConfig(method="tree", tree_candidates="sampled_distinct", tree_depth=3, tree_top_k=3,
                                tree_total_tokens=6, temperature=0.7, top_p=0.8, max_new_tokens=3,
                                verification="traversal"), marks=pytest.mark.slow),
], ids=["chain-T0.7-top-p", "chain", "tree", "tree-T0.7-top-p", "sampled-tree", "sampled-tree-T0.7-top-p"])
def test_traversal_decoding_keeps_the_target_distribution(config):
    """test_decoding's end-to-end G-test (the joint of 3 sampled tokens on a 5-token vocabulary) with traversal
    verification (-m slow: the verifier-level tests above run by default)."""
    assert_sampled_output_has_the_target_distribution(config)


@pytest.mark.parametrize("method", ["chain", "tree"])
def test_greedy_traversal_equals_plain_decoding(tiny, method):
    config = DecodingConfig(method=method, gamma=4, tree_depth=4, tree_top_k=3, tree_total_tokens=12,
                            max_new_tokens=40, verification="traversal")
    decoder = Decoder(tiny.target, untrained("eagle3", tiny.target).drafting("cpu"), config)
    for prompt, plain in zip(tiny.prompts, plain_outputs(tiny.target, tiny.prompts, config)):
        assert decoder.generate(prompt).output_ids == plain


def test_distinct_sampled_children_are_drawn_without_replacement():
    """Traversal (and top-down over sampled_distinct) reads q_j, the distribution of a node's j-th draw given the
    earlier ones, as q without them: the drafted tree must hold no repeated sibling, and without_replacement must draw
    in the sequential order (first draw ~ q, second ~ q without the first)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.tensor([0.6, 0.3, 0.1, 0.0])
    firsts, seconds_after_0 = torch.zeros(4), torch.zeros(4)
    for _ in range(6000):
        drawn = verification.without_replacement(q, 3, generator)
        assert sorted(drawn) == [0, 1, 2]  # distinct, never the zero-probability token, capped at the support
        firsts[drawn[0]] += 1
        if drawn[0] == 0:
            seconds_after_0[drawn[1]] += 1
    assert chi_square_test(firsts, q)[0] < chi_square_test(firsts, q)[1]
    after_0 = verification.without_draw(q, 0)
    assert chi_square_test(seconds_after_0, after_0)[0] < chi_square_test(seconds_after_0, after_0)[1]
    config = DecodingConfig(method="tree", tree_candidates="sampled_distinct", tree_depth=3, tree_top_k=4, tree_total_tokens=12,
                            temperature=1.5, max_new_tokens=12, verification="traversal")
    decoder = Decoder(FrozenTarget(random_lm(scale=1.0)), LMDrafting(random_lm(scale=1.0, noise=0.5), "cpu"), config)
    trees, draft_sampled_tree = [], decoder.draft_sampled_tree
    decoder.draft_sampled_tree = lambda logits, generator: trees.append(draft_sampled_tree(logits, generator)) or trees[-1]
    decoder.generate([1, 2, 3], generator)
    assert trees and all(len(drawn) == len(set(drawn)) for tree in trees for drawn in tree.draws)
    assert max(len(drawn) for tree in trees for drawn in tree.draws) == 4  # wide enough that repeats were likely
