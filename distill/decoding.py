"""The speculative decoder (batch size 1) and its baseline, plain autoregressive decoding with the same cache code.

One decoding step, after `prefill`:

    draft   the proposer drafts a chain of γ tokens, or an EAGLE-2 tree (expand the top_k children of the top_k
            best frontier nodes for `depth` levels, a node's score being its path's summed draft log-probability;
            keep the total_tokens − 1 best nodes, a connected subtree since a child never outscores its parent)
    verify  one target forward over [last token, drafted tokens] with a chain (causal) or tree (ancestor) mask and
            position ids n + depth
    accept  distill/verification.py picks the accepted tokens and the target's own next token
    commit  the target's cache keeps the accepted entries (chain: a truncation; tree: the accepted path is copied
            into place), the proposer drops its drafts and commits the accepted tokens with the target's features

At T > 0 a tree's children can also be sampled (`tree_candidates=sampled`, Multi-Candidate SD / SpecInfer): each
expanded node draws m ≤ top_k tokens i.i.d. from its draft distribution q, keeps the distinct ones as children, and
verification checks the draws in turn against the residual (distill/verification.py). Exactness needs every node's
draws to be i.i.d. from q given how many there are, so nothing prunes a node's children by their values: m is fixed
before the draws (top_k, or what is left of the budget of total_tokens − 1 nodes), and only the choice of which
nodes to expand next reads scores. Repeated draws cost no node: a rejected token has residual probability 0, so a
repeat of it is always rejected (it still updates the residual).

`tree_candidates=sampled_distinct` draws a node's m children without replacement instead (each draw from q without the
earlier ones, renormalised: m distinct children), and verification then checks draw j against q_j, that distribution.

`verification=traversal` (Traversal Verification; Block Verification on a chain) verifies the same drafts leaves first
with path-level weights (distill/verification.py), for chain and tree alike. It needs the distribution each child was
drawn from given its earlier siblings, which a repeated i.i.d. draw does not give a node of its own, so a sampled tree
under it draws without replacement (`sampled_distinct`). Greedy decoding accepts the same longest matching path
either way.

A parallel drafter (P-EAGLE: `Drafting.parallel`) drafts a round's positions in one forward, position k from its
marginal q_k, which reads the committed tokens only, never the drafts before k. Speculative sampling needs, at each
position, the distribution the draft was actually drawn from given everything drafted before it; for such a drafter
that is q_k itself (the draft at k is independent of the earlier drafts given the committed prefix), so accepting
with min(1, p_k(x)/q_k(x)) and resampling from norm(max(0, p_k − q_k)) keeps the output ~ p exactly, as for Medusa's
heads. Greedy verification never reads q.

Tokens committed per target forward are the step's accept length (τ is their mean; plain decoding has τ = 1).
EOS and max_new_tokens cut the committed tokens exactly where plain decoding would stop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import torch

from specdistill.distill.kv_cache import KVCache
from specdistill.distill.target import FrozenTarget, TargetOutput
from specdistill.distill import verification
from specdistill.distill.drafting import Drafting
from specdistill.distill.errors import UserError
from specdistill.distill.lean import lean_target
from specdistill.distill.masks import PrefixMask, as_model_mask, causal_block, check_attention_implementation


class Method(str, Enum):  # a str, so code and tests may also write the plain name ("chain")
    chain = "chain"
    tree = "tree"


class TreeCandidates(str, Enum):
    """How a tree node's children are proposed."""

    top_k = "top_k"  # EAGLE-2: the drafter's top_k most likely tokens, reranked to total_tokens − 1 nodes
    sampled = "sampled"  # Multi-Candidate SD: top_k i.i.d. draws from q, recursive rejection sampling (T > 0)
    sampled_distinct = "sampled_distinct"  # top_k draws from q without replacement (T > 0)

    @property
    def sampled_draws(self) -> bool:
        return self != TreeCandidates.top_k


class Verification(str, Enum):
    """How the target checks the drafts at T > 0 (greedy decoding is the same for both)."""

    top_down = "top_down"  # token by token from the root (Leviathan et al.; recursive rejection over siblings)
    traversal = "traversal"  # leaves first with path-level acceptance (Traversal / Block Verification)


class DraftLength(str, Enum):
    """How many tokens a chain step drafts: always gamma, or fewer when the drafter is unsure (`draft_chain`)."""

    fixed = "fixed"
    confidence = "confidence"  # stop after a position whose top draft probability is below draft_threshold
    cumulative = "cumulative"  # stop when the product of the top probabilities so far is below draft_threshold
    learned = "learned"  # stop when the product of the stop head's acceptance estimates is below draft_threshold


@dataclass
class DecodingConfig:
    """The decoding settings, one schema for every user: `eval.*` (extended by eval/config.py), τ during training
    (`train.tau.*`) and export's speculative-token count (its `gamma`). Ranges: `check_decoding`."""

    method: Method = Method.chain
    gamma: int = 5  # chain: drafted tokens per step (with a dynamic draft_length: at most)
    draft_length: DraftLength = DraftLength.fixed  # chain: fixed, confidence, cumulative or learned (dynamic length)
    draft_threshold: float = 0.4  # the dynamic draft length's stopping threshold, a probability
    tree_depth: int = 6  # tree (EAGLE-2): draft levels
    tree_top_k: int = 10  # tree: children per expanded node and nodes expanded per level
    tree_total_tokens: int = 60  # tree: verified tokens per step (root included)
    tree_candidates: TreeCandidates = TreeCandidates.top_k  # tree: top_k (EAGLE-2), sampled or sampled_distinct (T > 0)
    verification: Verification = Verification.top_down  # T > 0: top_down or traversal (chain and tree)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        self.method = Method(self.method)
        self.draft_length = DraftLength(self.draft_length)
        self.tree_candidates = TreeCandidates(self.tree_candidates)
        self.verification = Verification(self.verification)

    @property
    def draft_depth_key(self) -> str:
        """The field that sets how deep a step drafts: gamma for a chain, tree_depth for a tree."""
        return "gamma" if self.method == Method.chain else "tree_depth"

    @property
    def draft_depth(self) -> int:
        """Draft positions a step can reach."""
        return getattr(self, self.draft_depth_key)


# A config field → (the test a valid value passes, the valid range in words): what `check_ranges` reads.
Ranges = dict[str, tuple[Callable[[Any], bool], str]]

# DecodingConfig's ranges. Out-of-range values otherwise end deep in decoding (an empty reshape, a division by zero, NaN
# probabilities) or, for a negative temperature, silently decode greedily.
DECODING_RANGES: Ranges = {
    "gamma": (lambda v: v >= 1, "an integer ≥ 1"),
    "tree_depth": (lambda v: v >= 1, "an integer ≥ 1"),
    "tree_top_k": (lambda v: v >= 1, "an integer ≥ 1"),
    "tree_total_tokens": (lambda v: v >= 2, "an integer ≥ 2 (the root and at least one drafted token)"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a number ≥ 0 (0: greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "max_new_tokens": (lambda v: v >= 1, "an integer ≥ 1"),
    "draft_threshold": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
}


def config_key(group: str, key: str) -> str:
    """The user's name of a decoding setting: `eval.gamma`, `train.tau.gamma`, or `gamma` at the top level."""
    return f"{group}.{key}" if group else key


def check_ranges(config: Any, group: str, ranges: Ranges) -> None:
    """A UserError naming the first of `ranges`' keys whose value in `config` is outside its range, as the user writes
    it (`group`: the config group holding the settings)."""
    for key, (valid, valid_range) in ranges.items():
        value = getattr(config, key)
        if not valid(value):
            raise UserError(f"{config_key(group, key)}={value} is out of range: it must be {valid_range}")


def check_decoding(config: Any, group: str,
                   keys: tuple[str, ...] = (*DECODING_RANGES, "draft_length", "tree_candidates", "verification")) -> None:
    """The one range check of the decoding settings: a UserError naming the first of `keys` outside its range, as
    the user writes it (`group`: the config group holding the settings, e.g. `eval` or `train.tau`; a DictConfig or a
    DecodingConfig). Run it before anything loads."""
    check_ranges(config, group, {key: DECODING_RANGES[key] for key in keys if key in DECODING_RANGES})
    if "draft_length" in keys and Method(config.method) == Method.tree and DraftLength(config.draft_length) != DraftLength.fixed:
        raise UserError(f"{config_key(group, 'draft_length')}={DraftLength(config.draft_length).value} applies to "
                        f"chains only (an EAGLE-2 tree already sizes itself by the draft scores); set "
                        f"{config_key(group, 'method')}=chain or {config_key(group, 'draft_length')}=fixed")
    if "tree_candidates" not in keys:  # a caller checking a subset (export: its gamma) has no tree settings
        return
    candidates = TreeCandidates(config.tree_candidates)
    if candidates.sampled_draws:
        name = config_key(group, "tree_candidates")
        if Method(config.method) != Method.tree:
            raise UserError(f"{name}={candidates.value} applies to trees only; set {config_key(group, 'method')}=tree "
                            f"or {name}=top_k")
        if config.temperature <= 0:
            raise UserError(f"{name}={candidates.value} draws children from the drafter's distribution, which needs "
                            f"sampling; set {config_key(group, 'temperature')} > 0 or {name}=top_k")
    if (candidates == TreeCandidates.sampled and Method(config.method) == Method.tree
            and Verification(config.verification) == Verification.traversal):
        raise UserError(f"{config_key(group, 'verification')}=traversal reads the distribution each child was drawn "
                        f"from given its earlier siblings, which repeated i.i.d. draws do not have; set "
                        f"{config_key(group, 'tree_candidates')}=sampled_distinct (draws without replacement)")


@dataclass
class Generation:
    output_ids: list[int]
    accept_lengths: list[int]  # tokens committed by each decoding step's target forward (prefill excluded)
    reached: list[int]  # per draft position k = 1, 2, …: steps whose verification got to position k
    accepted: list[int]  # … and accepted the token there
    draft_lengths: list[int] = field(default_factory=list)  # tokens drafted and verified by each decoding step
    seconds: float = 0.0  # wall time of the whole generation, prefill included
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    drafter_calls: int = 0
    target_calls: int = 0
    # Decoder(record_target=True): what the target computed along the decoded sequence (prompt + output_ids, L
    # positions), for online adaptation: features [1, L, hidden] per drafter layer and logits [1, L, vocab]; a
    # position the decoding never ran the target on (the last one) or kept no logits for (the prompt's, but its last)
    # holds zeros
    target_output: TargetOutput | None = None


@dataclass
class Tree:
    tokens: torch.Tensor  # [N] drafted tokens, parents before children
    parents: torch.Tensor  # [N] index of the parent node, −1 for children of the root
    depths: torch.Tensor  # [N] 1 for children of the root
    ancestors: torch.Tensor  # [N, N] bool: node j is node i or one of its ancestors
    drafter_steps: int  # proposer.step calls that drafted it
    # sampled trees: per row (0 = root, then the nodes) the tokens drawn there in order, repeats included, and the
    # draft distribution q they were drawn from (None: a top-k tree)
    draws: list[list[int]] | None = None
    draft_probs: dict[int, torch.Tensor] | None = None


class TargetRecord:
    """The target's features and logits along a decoded sequence, gathered from the forwards decoding runs anyway
    (Decoder(record_target=True)): the prefill's features of the prompt and logits after its last token, then each
    step's rows that stay (root and accepted drafts: the sequence's next positions)."""

    def __init__(self, prompt_length: int, prefill: TargetOutput):
        self.features = {layer_id: [feature[:, :prompt_length]] for layer_id, feature in prefill.features.items()}
        last = prefill.logits[:, -1:]
        self.logits = [last.new_zeros(1, prompt_length - 1, last.shape[-1]), last]

    def add(self, features: dict[int, torch.Tensor], logits: torch.Tensor) -> None:
        """A step's kept rows: the drafter's layers' features and the target's logits there."""
        for layer_id, feature in features.items():
            self.features[layer_id].append(feature)
        self.logits.append(logits)

    def finish(self, length: int) -> TargetOutput:
        """→ [1, length, …] tensors: rows past the sequence's end (a step cut at EOS) dropped, a missing last row 0."""
        def fit(chunks: list[torch.Tensor]) -> torch.Tensor:
            joined = torch.cat(chunks, dim=1)[:, :length]
            return torch.nn.functional.pad(joined, (0, 0, 0, length - joined.shape[1]))

        return TargetOutput(fit(self.logits), {layer_id: fit(chunks) for layer_id, chunks in self.features.items()},
                            None)


def check_draft_depth(limit: int | None, config: DecodingConfig, group: str, drafter: str) -> None:
    """The one policy for a chain or tree deeper than the drafter can draft (`limit`, e.g. a Medusa drafter's heads;
    None: no limit): refuse it, before any decoding, with one line naming the key to lower."""
    unit = "tokens" if config.method == Method.chain else "levels"
    if limit is not None and config.draft_depth > limit:
        name = config_key(group, config.draft_depth_key)
        raise UserError(f"{name}={config.draft_depth}: this drafter ({drafter}) drafts at most {limit} {unit} per "
                        f"step; set {name} ≤ {limit}")


def check_stop_head(proposer: Drafting, config: DecodingConfig, group: str) -> None:
    """draft_length=learned reads the drafter's stop head: refuse a drafter without one, naming what to do."""
    if config.method == Method.chain and config.draft_length == DraftLength.learned and not proposer.has_stop_head:
        from specdistill.distill.drafters.registry import kinds_with_stop_head  # the registry imports drafters

        raise UserError(f"{config_key(group, 'draft_length')}=learned reads the drafter's stop head, and this drafter "
                        f"({type(proposer).__name__}) has none: train it with drafter.stop_head=true (drafter="
                        f"{'|'.join(kinds_with_stop_head())}), or set {config_key(group, 'draft_length')}=fixed, "
                        "confidence or cumulative")


def check_tree_width(config: DecodingConfig, vocab_size: int, group: str) -> None:
    """A tree cannot branch wider than the target's vocabulary: refuse tree_top_k above it, naming the key."""
    if config.method == Method.tree and config.tree_top_k > vocab_size:
        name = config_key(group, "tree_top_k")
        raise UserError(f"{name}={config.tree_top_k} is out of range: it must be at most the target's vocabulary "
                        f"size, {vocab_size}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Decoder:
    """Speculative decoding of `target` with `proposer`; with `proposer=None`, plain autoregressive decoding.

    The target runs through distill/lean.py's forward when it supports the model (`lean=False`: always through
    transformers' modules, as `FrozenTarget` does). `group` is the config group holding `config`, named when the
    drafter cannot draft that deep."""

    def __init__(
        self,
        target: FrozenTarget,
        proposer: Drafting | None,
        config: DecodingConfig,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        lean: bool = True,
        group: str = "eval",
        record_target: bool = False,
    ):
        self.target, self.config, self.group = target, config, group
        self.use_proposer(proposer)
        self.record_target = record_target and proposer is not None
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = next(target.parameters()).device
        self.mask = PrefixMask(self.device)
        self.chain_block = causal_block(config.gamma + 1, self.device)
        self.feature_layers = proposer.feature_layers if proposer is not None else ()
        self.lean = lean_target(target) if lean else None  # None: through transformers' modules
        if self.lean is None:
            check_attention_implementation(target.config, "target")

    def use_proposer(self, proposer: Drafting | None) -> None:
        """Draft with `proposer` from the next generation on (online adaptation swaps in its updated drafter)."""
        if proposer is not None:
            check_draft_depth(proposer.max_depth, self.config, self.group, type(proposer).__name__)
            check_stop_head(proposer, self.config, self.group)
            proposer.draft_depth = self.config.draft_depth
        self.proposer = proposer

    @property
    def greedy(self) -> bool:
        return self.config.temperature <= 0.0

    # -- the target ------------------------------------------------------------------------------------------

    def _target(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, last_logits_only: bool = False
    ) -> TargetOutput:
        if self.lean is not None:
            return self.lean(tokens, positions, self.cache, mask, self.feature_layers, last_logits_only)
        mask = as_model_mask(mask, self.target.config, self.target.model.dtype)
        return self.target(tokens, attention_mask=mask, past_key_values=self.cache, position_ids=positions,
                           feature_layers=self.feature_layers)

    def _choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """The target's own next token: argmax, or a sample from its (temperature, top-p) distribution."""
        if self.greedy:
            return int(logits.argmax())
        return int(verification.sample(self._probs(logits), generator))

    def prefill(self, prompt: torch.Tensor, generator: torch.Generator | None) -> tuple[int, TargetOutput]:
        self.cache = KVCache(capacity=prompt.shape[1] + self.config.max_new_tokens + self.config.tree_total_tokens)
        positions = torch.arange(prompt.shape[1], device=self.device)[None]
        output = self._target(prompt, positions, None, last_logits_only=True)  # an empty cache: causal by default
        return self._choose(output.logits[0, -1], generator), output

    # -- drafting --------------------------------------------------------------------------------------------

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution (temperature, top-p) of target and drafter alike."""
        return verification.target_probs(logits, self.config.temperature, self.config.top_p)

    def draft_chain(self, logits: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to γ tokens, each the drafter's argmax (greedy) or a sample from its distribution q → (tokens, q).

        A dynamic draft length ends the chain after position k < γ when the drafter is unsure there: its top
        probability p_k = max q_k (confidence; q_k at temperature 1 when greedy) or the running product p_1 ⋯ p_k,
        an estimate of the chance that all k drafts are accepted (cumulative), is below draft_threshold; learned
        (SpecDec++) takes that product over the stop head's estimates a_k = P(draft k accepted) instead. Token k is
        kept (its drafter forward is already paid); the forward for k + 1 is the one saved, with its verified position.
        The rule reads the drafter only, never the target, and every drafted prefix is verified exactly, so output
        stays lossless."""
        config = self.config
        dynamic = config.draft_length != DraftLength.fixed
        tokens, draft_probs = [], []
        chain_confidence = 1.0
        last_row = torch.tensor([-1], device=self.device)
        for position in range(config.gamma):
            probs = None if self.greedy else self._probs(logits)
            if probs is None:
                token = logits.argmax(dim=-1, keepdim=True)
            else:
                draft_probs.append(probs)
                token = verification.sample(probs, generator)[None]
            tokens.append(token)
            if position + 1 == config.gamma:
                break
            if config.draft_length == DraftLength.learned:
                chain_confidence *= self.proposer.acceptance()
            elif dynamic:
                top = float((torch.softmax(logits.float(), dim=-1) if probs is None else probs).max())
                chain_confidence = top if config.draft_length == DraftLength.confidence else chain_confidence * top
            if dynamic and chain_confidence < config.draft_threshold:
                break
            logits = self.proposer.step(token, last_row, depth=position + 1, block=None)[-1]
        return torch.cat(tokens), (torch.stack(draft_probs) if draft_probs else None)

    def draft_tree(self, logits: torch.Tensor) -> Tree:
        """EAGLE-2's dynamic tree (module doc). Node ids are in generation order, so parents precede children."""
        top_k, device = self.config.tree_top_k, self.device
        scores, frontier_tokens = torch.log_softmax(logits.float(), dim=-1).topk(top_k)
        all_tokens, all_scores = [frontier_tokens], [scores]
        all_parents, all_depths = [torch.full((top_k,), -1, device=device)], [torch.ones(top_k, dtype=torch.long, device=device)]
        frontier_ids, frontier_scores = torch.arange(top_k, device=device), scores
        parent_rows = torch.full((top_k,), -1, device=device)  # rows of the proposer's last output
        block = torch.eye(top_k, dtype=torch.bool, device=device)  # visibility among the fed frontier entries
        generated = top_k
        for depth in range(1, self.config.tree_depth):
            logits = self.proposer.step(frontier_tokens, parent_rows, depth=depth, block=block)
            child_scores, child_tokens = torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
            candidate_scores = (frontier_scores[:, None] + child_scores).flatten()  # [k·k]
            all_tokens.append(child_tokens.flatten())
            all_scores.append(candidate_scores)
            all_parents.append(frontier_ids.repeat_interleave(top_k))
            all_depths.append(torch.full((top_k * top_k,), depth + 1, device=device))
            best = candidate_scores.topk(top_k).indices
            parent_rows = best // top_k
            frontier_ids, frontier_scores = generated + best, candidate_scores[best]
            frontier_tokens = child_tokens.flatten()[best]
            block = torch.cat([block[parent_rows], torch.eye(top_k, dtype=torch.bool, device=device)], dim=1)
            generated += top_k * top_k
        tokens, scores = torch.cat(all_tokens), torch.cat(all_scores)
        parents, depths = torch.cat(all_parents), torch.cat(all_depths)
        # rerank: the best total_tokens − 1 nodes; a stable sort puts a parent before a child of equal score
        keep = min(self.config.tree_total_tokens - 1, len(tokens))
        selected = torch.sort(scores, descending=True, stable=True).indices[:keep].sort().values
        new_index = torch.full((len(tokens),), -1, device=device)
        new_index[selected] = torch.arange(keep, device=device)
        selected_parents = parents[selected]
        selected_parents = torch.where(selected_parents >= 0, new_index[selected_parents.clamp_min(0)], -1)
        ancestors = _ancestors(selected_parents, self.config.tree_depth)
        return Tree(tokens[selected], selected_parents, depths[selected], ancestors, self.config.tree_depth - 1)

    def draft_sampled_tree(self, logits: torch.Tensor, generator) -> Tree:
        """A tree of i.i.d. draws, or draws without replacement (module doc): level by level, the top_k best-scoring
        nodes of the last level (path log-probability, as in EAGLE-2) are expanded, in score order, each with
        m = min(top_k, nodes left) draws from its q; the distinct draws become its children."""
        config, device = self.config, self.device
        budget = config.tree_total_tokens - 1
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        scores: list[float] = []
        draws: list[list[int]] = [[]]
        draft_probs: dict[int, torch.Tensor] = {}

        def expand(node: int, probs: torch.Tensor, depth: int) -> list[int]:
            """Draw node's children (node −1: the root) → the new nodes."""
            nonlocal budget
            count = min(config.tree_top_k, budget)
            if count == 0:
                return []
            if config.tree_candidates == TreeCandidates.sampled_distinct:
                drawn = verification.without_replacement(probs, count, generator)
            else:
                drawn = torch.multinomial(probs, count, replacement=True, generator=generator).tolist()
            draws[node + 1], draft_probs[node + 1] = drawn, probs
            children = []
            for token in dict.fromkeys(drawn):  # distinct, in draw order
                children.append(len(tokens))
                tokens.append(token)
                parents.append(node)
                depths.append(depth)
                scores.append((scores[node] if node >= 0 else 0.0) + math.log(float(probs[token])))
                draws.append([])
            budget -= len(children)
            return children

        level = expand(-1, self._probs(logits), 1)
        frontier: list[int] = []
        block = torch.zeros(0, 0, dtype=torch.bool, device=device)
        steps = 0
        for depth in range(1, config.tree_depth):
            if budget == 0 or not level:
                break
            chosen = sorted(level, key=lambda node: -scores[node])[: config.tree_top_k]
            # each chosen node's row in the proposer's last output (−1: the last committed entry's), and what it sees
            # of the entries fed so far: its parent's view and itself
            eye = torch.eye(len(chosen), dtype=torch.bool, device=device)
            if frontier:
                parent_rows = torch.tensor([frontier.index(parents[node]) for node in chosen], device=device)
                block = torch.cat([block[parent_rows], eye], dim=1)
            else:
                parent_rows, block = torch.full((len(chosen),), -1, device=device), eye
            frontier = chosen
            fed = torch.tensor([tokens[node] for node in chosen], device=device)
            probs = self._probs(self.proposer.step(fed, parent_rows, depth=depth, block=block))
            steps += 1
            level = [child for row, node in enumerate(chosen) for child in expand(node, probs[row], depth + 1)]
        parents_tensor = torch.tensor(parents, device=device)
        return Tree(torch.tensor(tokens, device=device), parents_tensor, torch.tensor(depths, device=device),
                    _ancestors(parents_tensor, config.tree_depth), steps, draws, draft_probs)

    # -- one step --------------------------------------------------------------------------------------------

    def verify_chain(
        self, root: int, drafted: torch.Tensor, draft_probs: torch.Tensor | None, generator
    ) -> tuple[list[int], list[int], TargetOutput]:
        """→ (committed tokens, verified rows whose entries stay: root + accepted drafts, the target's output)"""
        length = self.cache.length
        tokens = torch.cat([torch.tensor([root], device=self.device), drafted])[None]
        positions = torch.arange(length, length + len(drafted) + 1, device=self.device)[None]
        size = len(drafted) + 1  # fewer than γ + 1 when the draft length is dynamic
        output = self._target(tokens, positions, self.mask(length, self.chain_block[:size, :size]))
        logits = output.logits[0]
        if self.greedy:
            accepted, next_token = verification.accept_chain_greedy(drafted, logits)
        elif self.config.verification == Verification.traversal:  # a chain is a tree with one child per row
            chain_children = [[row + 1] for row in range(len(drafted))] + [[]]
            path, next_token = verification.accept_tree_traversal(
                [root, *drafted.tolist()], chain_children, self._probs(logits), dict(enumerate(draft_probs)),
                generator)
            accepted = len(path)
        else:
            accepted, next_token = verification.accept_chain_sampling(drafted, draft_probs, self._probs(logits), generator)
        self.cache.truncate(length + 1 + accepted)
        rows = list(range(accepted + 1))  # root and the accepted drafts
        return drafted[:accepted].tolist() + [next_token], rows, output

    def verify_tree(self, root: int, tree: Tree, generator) -> tuple[list[int], list[int], TargetOutput]:
        length, size = self.cache.length, len(tree.tokens) + 1
        tokens = torch.cat([torch.tensor([root], device=self.device), tree.tokens])[None]
        positions = (length + torch.cat([torch.zeros(1, dtype=torch.long, device=self.device), tree.depths]))[None]
        block = torch.zeros(size, size, dtype=torch.bool, device=self.device)
        block[:, 0] = True  # every node sees the root
        block[1:, 1:] = tree.ancestors
        output = self._target(tokens, positions, self.mask(length, block))
        logits = output.logits[0]
        row_tokens = [root] + tree.tokens.tolist()
        children: list[list[int]] = [[] for _ in range(size)]
        for node, parent in enumerate(tree.parents.tolist()):
            children[parent + 1].append(node + 1)
        if self.greedy:
            path, next_token = verification.accept_tree_greedy(row_tokens, children, logits.argmax(dim=-1).tolist())
        elif self.config.verification == Verification.traversal:  # no draft_probs: top-k children, q_j one-hot
            path, next_token = verification.accept_tree_traversal(
                row_tokens, children, self._probs(logits), tree.draft_probs or {}, generator)
        elif tree.draws is not None:
            path, next_token = verification.accept_tree_multi_candidate(
                row_tokens, children, tree.draws, tree.draft_probs, self._probs(logits), generator,
                without_replacement=self.config.tree_candidates == TreeCandidates.sampled_distinct)
        else:
            path, next_token = verification.accept_tree_sampling(row_tokens, children, self._probs(logits), generator)
        rows = [0] + path
        self.cache.keep_path(length, torch.tensor(rows, device=self.device))
        return [row_tokens[row] for row in path] + [next_token], rows, output

    # -- the loop --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], generator: torch.Generator | None = None) -> Generation:
        config = self.config
        depth = config.draft_depth
        result = Generation([], [], [0] * depth, [0] * depth)
        _sync(self.device)
        started = time.perf_counter()
        prompt = torch.tensor([prompt_ids], device=self.device)
        token, output = self.prefill(prompt, generator)
        record = TargetRecord(len(prompt_ids), output) if self.record_target else None
        result.target_calls += 1
        done = self._commit(result, [token], decoding_step=False)
        if self.proposer is not None and not done:
            draft_logits = self.proposer.begin(prompt, output.features, torch.tensor([[token]], device=self.device))
            result.drafter_calls += self.proposer.calls_per_commit
        while not done:
            root = result.output_ids[-1]
            result.target_calls += 1
            if self.proposer is None:
                positions = torch.tensor([[self.cache.length]], device=self.device)
                logits = self._target(torch.tensor([[root]], device=self.device), positions, None).logits[0, -1]
                done = self._commit(result, [self._choose(logits, generator)])
                continue
            draft_started = time.perf_counter()
            if config.method == Method.chain:
                drafted, draft_probs = self.draft_chain(draft_logits, generator)
                # one drafter forward per token after the first (its logits came with the last catch-up); a parallel
                # drafter drafted the whole chain in its begin/extend call
                result.drafter_calls += 0 if self.proposer.parallel else len(drafted) - 1
                result.draft_lengths.append(len(drafted))
                reachable = len(drafted)
                _sync(self.device)
                verify_started = time.perf_counter()
                committed, rows, output = self.verify_chain(root, drafted, draft_probs, generator)
            else:
                if config.tree_candidates.sampled_draws:
                    tree = self.draft_sampled_tree(draft_logits, generator)
                else:
                    tree = self.draft_tree(draft_logits)
                result.drafter_calls += 0 if self.proposer.parallel else tree.drafter_steps
                result.draft_lengths.append(len(tree.tokens))
                reachable = depth
                _sync(self.device)
                verify_started = time.perf_counter()
                committed, rows, output = self.verify_tree(root, tree, generator)
            self.proposer.observe(output.logits[0, 0], config.temperature, config.top_p)
            accepted = len(committed) - 1
            for position in range(min(accepted + 1, reachable)):
                result.reached[position] += 1
                result.accepted[position] += position < accepted
            done = self._commit(result, committed)
            _sync(self.device)
            verified = time.perf_counter()
            if record is not None or not done:  # the features of the rows that stay, once for both
                rows_tensor = torch.tensor(rows, device=self.device)
                features = {layer_id: feature[:, rows_tensor] for layer_id, feature in output.features.items()}
                if record is not None:
                    record.add(features, output.logits[:, rows_tensor])
            if not done:  # the drafter catches up on the accepted tokens with the target's features of them
                draft_logits = self.proposer.extend(torch.tensor([committed], device=self.device), features)
                result.drafter_calls += self.proposer.calls_per_commit
                _sync(self.device)
            result.draft_seconds += (verify_started - draft_started) + (time.perf_counter() - verified)
        _sync(self.device)
        result.seconds = time.perf_counter() - started
        result.verify_seconds = result.seconds - result.draft_seconds
        if record is not None:
            result.target_output = record.finish(len(prompt_ids) + len(result.output_ids))
        return result

    def _commit(self, result: Generation, tokens: list[int], decoding_step: bool = True) -> bool:
        """Append the step's tokens, cut at EOS or max_new_tokens; True when generation is over."""
        room = self.config.max_new_tokens - len(result.output_ids)
        tokens = tokens[:room]
        for index, token in enumerate(tokens):
            if token in self.eos_token_ids:
                tokens = tokens[: index + 1]
                break
        if decoding_step:  # the prefill's token is not a decoding step
            result.accept_lengths.append(len(tokens))
        result.output_ids.extend(tokens)
        return len(result.output_ids) >= self.config.max_new_tokens or tokens[-1] in self.eos_token_ids


def _ancestors(parents: torch.Tensor, depth: int) -> torch.Tensor:
    """[N, N] bool, row i marks node i and its ancestors: follow every node's parent pointer `depth` − 1 times
    (a node at depth d has d − 1 ancestors below the root); finished chains point at the root (−1) and mark nothing."""
    count = len(parents)
    ancestors = torch.eye(count, dtype=torch.bool, device=parents.device)
    rows = torch.arange(count, device=parents.device)
    pointer = parents
    for _ in range(depth - 1):
        alive = pointer >= 0
        ancestors[rows, pointer.clamp_min(0)] |= alive
        pointer = torch.where(alive, parents[pointer.clamp_min(0)], pointer)
    return ancestors
