"""The speculative decoder is lossless: greedy output equals plain greedy decoding token for token (chain and tree,
untrained and trained drafters, EOS and max_new_tokens edges), sampled output has the target's distribution, and τ
is exact for drafters that are always right (γ + 1) or always wrong (1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from specdistill.distill.drafters import drafter_kind, load_drafting
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.drafters.token_lm import LMDrafting
from specdistill.distill.target import FrozenTarget
from specdistill.distill import verification
from specdistill.distill.decoding import Decoder, DecodingConfig

CHAIN = DecodingConfig(method="chain", gamma=4, max_new_tokens=40)
TREE = DecodingConfig(method="tree", tree_depth=4, tree_top_k=3, tree_total_tokens=12, max_new_tokens=40)


def plain_outputs(target: FrozenTarget, prompts, config: DecodingConfig, eos=frozenset()) -> list[list[int]]:
    decoder = Decoder(target, None, config, eos)
    return [decoder.generate(prompt).output_ids for prompt in prompts]


UNTRAINED_OPTIONS = {"eagle1": {}, "eagle3": {"feature_layers": [0, 1, -1], "draft_vocab_size": 512},
                     "peagle": {"feature_layers": [0, 1, -1], "draft_vocab_size": 512},
                     "dflash": {"feature_layers": [1, -1], "block_size": 6}}


def untrained(kind: str, target: FrozenTarget):
    torch.manual_seed(0)
    unit = drafter_kind(kind)
    return unit.model_class.build(unit.options(**UNTRAINED_OPTIONS[kind]), BuildContext(target))


@pytest.mark.parametrize("config", [CHAIN, TREE], ids=["chain", "tree"])
@pytest.mark.parametrize("kind", list(UNTRAINED_OPTIONS))
def test_greedy_equals_plain_decoding_with_untrained_drafters(tiny, kind, config):
    expected = plain_outputs(tiny.target, tiny.prompts, config)
    decoder = Decoder(tiny.target, untrained(kind, tiny.target).drafting("cpu"), config)
    for prompt, plain in zip(tiny.prompts, expected):
        generation = decoder.generate(prompt)
        assert generation.output_ids == plain
        assert sum(generation.accept_lengths) + 1 == len(plain)  # the prefill makes the first token


@pytest.mark.slow
@pytest.mark.parametrize("config", [CHAIN, TREE], ids=["chain", "tree"])
def test_greedy_equals_plain_decoding_with_a_trained_drafter(tiny, trained_drafter, config):
    out_dir, result = trained_drafter("eagle3")
    assert result.returncode == 0, result.stderr[-2000:]
    proposer = load_drafting(str(out_dir / "drafter"), tiny.target, "cpu")
    decoder = Decoder(tiny.target, proposer, config)
    expected = plain_outputs(tiny.target, tiny.prompts, config)
    accept_lengths = []
    for prompt, plain in zip(tiny.prompts, expected):
        generation = decoder.generate(prompt)
        assert generation.output_ids == plain
        accept_lengths += generation.accept_lengths
    tau = sum(accept_lengths) / len(accept_lengths)
    print(config.method, "trained eagle3 tau", round(tau, 3))
    assert tau > 1.2  # the trained drafter is accepted often; an untrained one almost never


@pytest.mark.parametrize("max_new_tokens", [1, 2, 4, 5, 6, 23])
@pytest.mark.parametrize("method", ["chain", "tree"])
def test_max_new_tokens_and_eos_cut_exactly_where_plain_decoding_stops(tiny, max_new_tokens, method):
    config = DecodingConfig(method=method, gamma=4, tree_depth=4, tree_top_k=3, tree_total_tokens=12,
                            max_new_tokens=max_new_tokens)
    oracle = LMDrafting(tiny.model, "cpu")  # always right: steps commit γ+1 tokens, so the cuts fall mid-step
    for prompt in tiny.prompts[:3]:
        [plain] = plain_outputs(tiny.target, [prompt], config)
        assert len(plain) == max_new_tokens
        assert Decoder(tiny.target, oracle, config).generate(prompt).output_ids == plain
        if max_new_tokens > 2:  # an EOS inside the run: both stop right after its first occurrence
            eos = {plain[max_new_tokens // 2]}
            [plain_eos] = plain_outputs(tiny.target, [prompt], config, eos)
            assert plain_eos == plain[: plain.index(plain[max_new_tokens // 2]) + 1]
            assert Decoder(tiny.target, oracle, config, eos).generate(prompt).output_ids == plain_eos


class WrongLM(nn.Module):
    """A drafter whose argmax is always the target's argmin: never right."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner, self.config, self.dtype = model, model.config, model.dtype

    def forward(self, **kwargs):
        return SimpleNamespace(logits=-self.inner(**kwargs).logits)


def test_tau_is_gamma_plus_one_for_an_always_right_drafter_and_one_for_an_always_wrong_one(tiny):
    gamma, steps = 4, 6
    config = DecodingConfig(method="chain", gamma=gamma, max_new_tokens=1 + steps * (gamma + 1))
    right = Decoder(tiny.target, LMDrafting(tiny.model, "cpu"), config).generate(tiny.prompts[0])
    assert right.accept_lengths == [gamma + 1] * steps
    assert right.accepted == right.reached == [steps] * gamma  # α_k = 1 at every position
    wrong = Decoder(tiny.target, LMDrafting(WrongLM(tiny.model), "cpu"), config).generate(tiny.prompts[0])
    assert wrong.accept_lengths == [1] * (config.max_new_tokens - 1)
    assert wrong.accepted == [0] * gamma and wrong.reached == [config.max_new_tokens - 1] + [0] * (gamma - 1)
    # every generated node kept (3 + 3·9 < 40): the argmax path is in the tree
    tree = DecodingConfig(method="tree", tree_depth=4, tree_top_k=3, tree_total_tokens=40, max_new_tokens=1 + 6 * 5)
    assert Decoder(tiny.target, LMDrafting(tiny.model, "cpu"), tree).generate(tiny.prompts[0]).accept_lengths == [5] * 6


@pytest.mark.parametrize("draft_length, threshold", [("confidence", 0.7), ("cumulative", 0.3)])
def test_greedy_equals_plain_decoding_with_a_dynamic_draft_length(draft_length, threshold):
    """Chains cut short when the drafter is unsure still decode exactly as plain decoding does, and the counts stay
    exact: drafter calls, α's reached positions and the drafted lengths agree with each other."""
    target_model, drafter_model = random_lm(scale=60.0, vocab=16), random_lm(scale=30.0, noise=0.5, vocab=16)
    target = FrozenTarget(target_model)
    prompts = [[1, 2, 3], [4, 5], [7, 1, 9, 2]]
    config = DecodingConfig(method="chain", gamma=4, max_new_tokens=30, draft_length=draft_length,
                            draft_threshold=threshold)
    fixed = DecodingConfig(method="chain", gamma=4, max_new_tokens=30)
    lengths = []
    for prompt, plain in zip(prompts, plain_outputs(target, prompts, config)):
        generation = Decoder(target, LMDrafting(drafter_model, "cpu"), config).generate(prompt)
        assert generation.output_ids == plain
        assert len(generation.draft_lengths) == len(generation.accept_lengths)
        assert generation.reached[0] == len(generation.accept_lengths)  # every step drafts at least one token
        assert sum(generation.reached) <= sum(generation.draft_lengths)
        # begin, each chain's steps (one fewer than its tokens: a cut chain keeps the token it stopped after), a
        # catch-up per step but the last
        chain_steps = sum(length - 1 for length in generation.draft_lengths)
        assert generation.drafter_calls == 1 + chain_steps + len(generation.accept_lengths) - 1
        lengths += generation.draft_lengths
        fixed_generation = Decoder(target, LMDrafting(drafter_model, "cpu"), fixed).generate(prompt)
        assert fixed_generation.draft_lengths == [4] * len(fixed_generation.accept_lengths)
    assert min(lengths) < 4 and max(lengths) == 4, lengths  # the rule both cut chains and let them run


# ---- sampling keeps the target's distribution ---------------------------------------------------------------

def chi_square_test(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of observed `counts` against `probs`, cells expecting < 5 pooled into one, and its
    critical value at p = 0.001 (Wilson–Hilferty approximation)."""
    expected = probs * counts.sum()
    assert counts[expected == 0].sum() == 0, "sampled a token sequence the target gives probability 0"
    large = expected >= 5
    observed = torch.cat([counts[large], counts[~large].sum()[None]])
    expected = torch.cat([expected[large], expected[~large].sum()[None]])
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    z = 3.090  # the standard normal's 0.999 quantile
    critical = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    return statistic, critical


P_ONE_STEP = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])  # the target's distribution in the one-step tests
Q_ONE_STEP = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])  # the drafter's


def one_step_multi_candidate_counts(draws: int, without_replacement: bool = False) -> torch.Tensor:
    """The token a sampled tree's root emits, `draws` times: 3 i.i.d. drafts from q (repeats kept; or 3 draws without
    replacement), a child per distinct token, each child with draws of its own, so an accepted child is a real tree
    row."""
    generator = torch.Generator().manual_seed(0)
    p, q = P_ONE_STEP, Q_ONE_STEP
    counts = torch.zeros(6)
    for _ in range(draws):
        drawn = (verification.without_replacement(q, 3, generator) if without_replacement
                 else verification.sample(q.expand(3, -1), generator).tolist())
        distinct = list(dict.fromkeys(drawn))
        tokens = [9, *distinct]
        children = [list(range(1, len(tokens))), *[[] for _ in distinct]]
        path, next_token = verification.accept_tree_multi_candidate(
            tokens, children, [drawn, *[[] for _ in distinct]], {0: q}, p.expand(len(tokens), -1), generator,
            without_replacement)
        counts[tokens[path[0]] if path else next_token] += 1
    return counts


@pytest.mark.usefixtures("one_torch_thread")
def test_chain_and_tree_rejection_sampling_keep_the_target_distribution():
    """One verification with fixed p (target) and q (drafter) over 6 tokens: the emitted token ~ p."""
    generator = torch.Generator().manual_seed(0)
    p, q = P_ONE_STEP, Q_ONE_STEP
    draws = 20000
    chain, tree = torch.zeros(6), torch.zeros(6)
    tokens, children = [9, 0, 3], [[1, 2], [], []]  # root, then two deterministic siblings: tokens 0 and 3
    for _ in range(draws):
        drafted = verification.sample(q, generator)[None]
        accepted, next_token = verification.accept_chain_sampling(drafted, q[None], torch.stack([p, p]), generator)
        chain[int(drafted) if accepted else next_token] += 1
        path, next_token = verification.accept_tree_sampling(tokens, children, torch.stack([p, p, p]), generator)
        tree[tokens[path[0]] if path else next_token] += 1
    for counts in (chain, tree, one_step_multi_candidate_counts(draws), one_step_multi_candidate_counts(draws, True)):
        statistic, critical = chi_square_test(counts, p)
        assert statistic < critical


@pytest.mark.usefixtures("one_torch_thread")
def test_draws_without_replacement_checked_against_q_with_the_rejected_draw_in_it_are_caught(monkeypatch):
    """sampled_distinct's top-down check with q left unchanged after a rejection (as for i.i.d. draws): the next draw
    came from q without the rejected token, so the chi-square test must reject it."""
    monkeypatch.setattr(verification, "without_draw", lambda q, token: q)
    statistic, critical = chi_square_test(one_step_multi_candidate_counts(20000, without_replacement=True), P_ONE_STEP)
    assert statistic > critical, (statistic, critical)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("planted_bug", ["no residual update", "residual from p each time"])
def test_the_multi_candidate_check_catches_a_planted_bug(monkeypatch, planted_bug):
    """The same one-step test with the residual update broken: checking every draw against p itself, or resetting
    the residual to p − q each time (forgetting earlier rejections); the chi-square test must reject both."""
    p = P_ONE_STEP
    if planted_bug == "no residual update":
        monkeypatch.setattr(verification, "residual_distribution", lambda residual, q: residual)
    else:
        residual_distribution = verification.residual_distribution
        monkeypatch.setattr(verification, "residual_distribution", lambda residual, q: residual_distribution(p, q))
    statistic, critical = chi_square_test(one_step_multi_candidate_counts(20000), p)
    assert statistic > critical, (statistic, critical)


def random_lm(scale: float, noise: float = 0.0, vocab: int = 5, noise_seed: int = 2) -> LlamaForCausalLM:
    """A 1-layer random Llama with peaked distributions (LM head scaled); `noise` perturbs the head (drawn with
    `noise_seed`), so a drafter built with other scale and noise agrees with the target often but not always."""
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        head = model.lm_head.weight
        head.add_(noise * head.std() * torch.randn(head.shape, generator=generator)).mul_(scale)
    return model


def exact_joint(model: LlamaForCausalLM, prompt: list[int], length: int, temperature: float, top_p: float) -> torch.Tensor:
    """P(t_1 … t_length | prompt) under the target, by enumeration: [vocab] * length."""
    vocab = model.config.vocab_size
    joint = torch.ones(())
    prefixes: list[list[int]] = [[]]
    for _ in range(length):
        with torch.no_grad():
            logits = torch.stack([model(torch.tensor([prompt + prefix])).logits[0, -1] for prefix in prefixes])
        step = verification.target_probs(logits, temperature, top_p)  # [prefixes, vocab]
        joint = (joint.reshape(-1, 1) * step).reshape([vocab] * (len(prefixes[0]) + 1))
        prefixes = [prefix + [token] for prefix in prefixes for token in range(vocab)]
    return joint


def sampled_joint_counts(decoder: Decoder, prompt: list[int], draws: int) -> tuple[torch.Tensor, float]:
    """Counts of the 5³ joint outcomes of `draws` 3-token generations (fixed seed) and the drafts' acceptance rate."""
    generator = torch.Generator().manual_seed(0)
    counts, accepted, reached = torch.zeros(5 ** 3), 0, 0
    for _ in range(draws):
        generation = decoder.generate(prompt, generator)
        a, b, c = generation.output_ids
        counts[a * 25 + b * 5 + c] += 1
        accepted, reached = accepted + sum(generation.accepted), reached + sum(generation.reached)
    print("acceptance", round(accepted / reached, 3))
    return counts, accepted / reached


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "config",
    [pytest.param(DecodingConfig(method="chain", gamma=2, temperature=1.0, max_new_tokens=3), marks=pytest.mark.slow),
     DecodingConfig(method="chain", gamma=2, temperature=0.8, top_p=0.9, max_new_tokens=3),
     pytest.param(DecodingConfig(method="tree", tree_depth=2, tree_top_k=2, tree_total_tokens=5, temperature=1.0,
                                 max_new_tokens=3), marks=pytest.mark.slow),
     pytest.param(DecodingConfig(method="chain", gamma=2, temperature=1.0, max_new_tokens=3,
                                 draft_length="confidence", draft_threshold=0.6), marks=pytest.mark.slow),
     pytest.param(DecodingConfig(method="chain", gamma=2, temperature=0.7, top_p=0.8, max_new_tokens=3,
                                 draft_length="cumulative", draft_threshold=0.7), marks=pytest.mark.slow),
     pytest.param(DecodingConfig(method="tree", tree_candidates="sampled", tree_depth=2, tree_top_k=2,
                                 tree_total_tokens=5, temperature=1.0, max_new_tokens=3), marks=pytest.mark.slow),
     DecodingConfig(method="tree", tree_candidates="sampled", tree_depth=3, tree_top_k=3, tree_total_tokens=6,
                    temperature=0.7, top_p=0.8, max_new_tokens=3),
     pytest.param(DecodingConfig(method="tree", tree_candidates="sampled_distinct", tree_depth=3, tree_top_k=3,
                                 tree_total_tokens=6, temperature=1.0, max_new_tokens=3), marks=pytest.mark.slow),
     pytest.param(DecodingConfig(method="tree", tree_candidates="sampled_distinct", tree_depth=2, tree_top_k=2,
                                 tree_total_tokens=5, temperature=0.7, top_p=0.8, max_new_tokens=3),
                  marks=pytest.mark.slow)],
    ids=["chain", "chain-top-p", "tree", "chain-confidence", "chain-cumulative-top-p", "sampled-tree",
         "sampled-tree-T0.7-top-p", "distinct-sampled-tree", "distinct-sampled-tree-T0.7-top-p"],
)
def test_sampled_speculative_output_has_the_target_distribution(config):
    """End to end on a 5-token vocabulary: the joint distribution of 3 sampled tokens matches the target's exactly
    computed one (chi-square at p = 0.001 with a fixed seed), for fixed and dynamic draft lengths."""
    assert_sampled_output_has_the_target_distribution(config)


def assert_sampled_output_has_the_target_distribution(config: DecodingConfig, drafting: type = LMDrafting) -> None:
    """The end-to-end G-test above, for any decoding config (tests/test_traversal.py runs it with traversal) and any
    token-level drafting class (tests/test_stop_head.py: one with a stand-in stop head)."""
    target_model, drafter_model = random_lm(scale=60.0), random_lm(scale=30.0, noise=0.5)
    prompt, draws = [1, 2, 3], 4000
    exact = exact_joint(target_model, prompt, 3, config.temperature, config.top_p).flatten()
    decoder = Decoder(FrozenTarget(target_model), drafting(drafter_model, "cpu"), config)
    counts, acceptance = sampled_joint_counts(decoder, prompt, draws)
    assert 0.2 < acceptance < 0.9, "drafts must be accepted and rejected often, or the test proves little"
    if config.draft_length != "fixed":  # the rule must both stop chains early and let them run, or it proves little
        generator = torch.Generator().manual_seed(1)
        lengths = {length for _ in range(50) for length in decoder.generate(prompt, generator).draft_lengths}
        assert lengths == {1, 2}, lengths
    statistic, critical = chi_square_test(counts, exact)
    print(config.method, "chi-square", round(statistic, 1), "critical", round(critical, 1))
    assert statistic < critical


def parallel_drafter(kind: str, target_model: LlamaForCausalLM):
    """An untrained parallel drafter (every depth of a round from one forward) on a random_lm target: P-EAGLE with
    its LM head half the target's, DFlash with the target's own LM head after a final norm scaled by 0.3, so that
    drafts are peaked and accepted often but not always (acceptance 0.28–0.61 over the configurations below)."""
    torch.manual_seed(3)
    unit = drafter_kind(kind)
    if kind == "peagle":
        options = unit.options(feature_layers=[0, -1], num_layers=1, parallel_depths=3, draft_vocab_size=None)
    else:
        options = unit.options(feature_layers=[0, -1], num_layers=1, block_size=3)
    drafter = unit.model_class.build(options, BuildContext(FrozenTarget(target_model)))
    with torch.no_grad():
        (drafter.lm_head.weight if kind == "peagle" else drafter.norm.weight).mul_(0.5 if kind == "peagle" else 0.3)
    return drafter.drafting("cpu")


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "config",
    [DecodingConfig(method="chain", gamma=2, temperature=1.0, max_new_tokens=3),
     pytest.param(DecodingConfig(method="chain", gamma=2, temperature=0.7, top_p=0.8, max_new_tokens=3),
                  marks=pytest.mark.slow),
     pytest.param(DecodingConfig(method="tree", tree_depth=2, tree_top_k=2, tree_total_tokens=5, temperature=1.0,
                                 max_new_tokens=3), marks=pytest.mark.slow),
     pytest.param(DecodingConfig(method="tree", tree_depth=2, tree_top_k=2, tree_total_tokens=5, temperature=0.7,
                                 top_p=0.8, max_new_tokens=3), marks=pytest.mark.slow),
     pytest.param(DecodingConfig(method="tree", tree_candidates="sampled", tree_depth=2, tree_top_k=2,
                                 tree_total_tokens=5, temperature=1.0, max_new_tokens=3), marks=pytest.mark.slow),
     pytest.param(DecodingConfig(method="chain", gamma=2, temperature=1.0, max_new_tokens=3, verification="traversal"),
                  marks=pytest.mark.slow),
     pytest.param(DecodingConfig(method="tree", tree_candidates="sampled_distinct", tree_depth=2, tree_top_k=2,
                                 tree_total_tokens=5, temperature=0.7, top_p=0.8, max_new_tokens=3,
                                 verification="traversal"), marks=pytest.mark.slow)],
    ids=["chain", "chain-T0.7-top-p", "tree", "tree-T0.7-top-p", "sampled-tree", "chain-traversal",
         "distinct-sampled-tree-traversal-T0.7-top-p"],
)
@pytest.mark.parametrize("kind", ["peagle", pytest.param("dflash", marks=pytest.mark.slow)])
def test_a_parallel_drafter_keeps_the_target_distribution(kind, config):
    """The G-test of `test_sampled_speculative_output_has_the_target_distribution` with a parallel drafter, whose
    position-k draft is drawn from its marginal q_k (distill/decoding.py says why verifying against q_k is exact)."""
    target_model = random_lm(scale=20.0)
    prompt, draws = [1, 2, 3], 4000
    exact = exact_joint(target_model, prompt, 3, config.temperature, config.top_p).flatten()
    proposer = parallel_drafter(kind, target_model)
    assert proposer.parallel
    decoder = Decoder(FrozenTarget(target_model), proposer, config)
    counts, acceptance = sampled_joint_counts(decoder, prompt, draws)
    assert 0.2 < acceptance < 0.9, "drafts must be accepted and rejected often, or the test proves little"
    statistic, critical = chi_square_test(counts, exact)
    print(config.method, "chi-square", round(statistic, 1), "critical", round(critical, 1))
    assert statistic < critical


def test_several_drafters_share_a_target_that_decodes_through_transformers_in_any_order(tiny):
    """The target's taps are per call: an EAGLE-3 decoder made before an EAGLE-1 decoder on one target (not on the
    lean path) still gets its own layers' features (this order used to fail with KeyError: 0)."""
    plain = plain_outputs(tiny.target, tiny.prompts[:2], CHAIN)
    decoders = [Decoder(tiny.target, untrained(kind, tiny.target).drafting("cpu"), CHAIN, lean=False)
                for kind in ("eagle3", "eagle1")]
    for prompt, expected in zip(tiny.prompts[:2], plain):
        for decoder in decoders + decoders[::-1]:
            assert decoder.generate(prompt).output_ids == expected
