"""The drafting interface the speculative decoder (distill/decoding.py) drives for every drafter kind.

A `Drafting` keeps its own KV cache over the committed sequence and drafts on top of it:

    begin(prompt, features, first)  prefill on the prompt plus the target's first token → logits of the next draft
    step(tokens, parents, depth, block)  feed drafted tokens (a chain link, or one tree level) → their logits
    extend(tokens, features)  drop everything drafted (the rollback), commit the tokens the target accepted (+ its
                              bonus) → logits of the next draft
    observe(logits, T, top_p)  the target's logits at the step's first position, before `extend` (a no-op but for
                              online selection, distill/selection.py)

`parents` picks, for each fed token, the output row of the previous call that proposed it (feature-level heads feed
that row's hidden state back); `depth` is the tokens' distance from the last committed token (1 = first draft);
`block` is the boolean visibility among drafted entries (None: all of them, as in a chain). Logits are over the
target's vocabulary. `feature_layers` names the target layers whose features `begin`/`extend` must receive.

A parallel drafter (`parallel = True`: P-EAGLE) drafts every depth of a round in the one forward of `begin`/`extend`:
the decoder sets `draft_depth` (the deepest draft a round makes) once, and `step` at depth d only reads row d of that
forward, the same row for every fed token, since no draft position reads the tokens drafted before it. The decoder
then counts one drafter call per round.

Each drafter kind (distill/drafters/<kind>.py) returns its `Drafting` from `drafting(target, device)`. Feature-level
heads (EAGLE-1, EAGLE-3 and their relatives) share `FeatureDrafting` and only supply a `FeatureHead`, their decoding
forward on the fast ops of distill/lean.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
import torch.nn.functional as F

from specdistill.distill.kv_cache import KVCache
from specdistill.distill.masks import PrefixMask, causal_block


class Drafting(ABC):
    feature_layers: tuple[int, ...] = ()  # target layer ids whose features the drafter reads
    # a Hugging Face model transformers' assisted generation can run as the assistant (its baselines); None: none
    assistant_model: Any = None
    max_depth: int | None = None  # the deepest draft it can make (Medusa: its number of heads); None: unbounded
    parallel: bool = False  # every depth of a round comes from the one forward of begin/extend (module doc)
    draft_depth: int = 1  # set by the decoder: the deepest draft of a round (what a parallel forward fills)
    calls_per_commit: int = 1  # drafter forwards one `extend` runs (online selection: one per member)

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.length = 0  # committed positions in the cache
        self.mask = PrefixMask(self.device)

    @abstractmethod
    def begin(self, prompt_ids: torch.Tensor, features: dict[int, torch.Tensor], first_token: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def extend(self, tokens: torch.Tensor, features: dict[int, torch.Tensor]) -> torch.Tensor:
        ...

    @abstractmethod
    def step(self, tokens: torch.Tensor, parents: torch.Tensor, depth: int, block: torch.Tensor | None) -> torch.Tensor:
        ...

    has_stop_head: bool = False  # `acceptance` reads a learned estimate (drafter.stop_head)

    def acceptance(self) -> float:
        """The stop head's estimate that the token drafted from the logits of the last call is accepted
        (eval.draft_length=learned); only where `has_stop_head`."""
        raise NotImplementedError(f"{type(self).__name__} has no stop head")

    def observe(self, target_logits: torch.Tensor, temperature: float, top_p: float) -> None:
        """The target's logits at a step's first drafted position, once verified; online selection
        (distill/selection.py) scores its drafters with them, other drafters ignore them."""

    def _positions(self, count: int, offset: int = 0) -> torch.Tensor:
        return torch.arange(self.length + offset, self.length + offset + count, device=self.device)[None]

    def _commit_mask(self, count: int) -> torch.Tensor | None:
        """Committing `count` tokens after `length` cached ones: causal among them (none needed for one)."""
        return None if count == 1 else self.mask(self.length, causal_block(count, self.device))

    def _draft_mask(self, block: torch.Tensor | None) -> torch.Tensor | None:
        return None if block is None else self.mask(self.length, block)


class ParallelRounds:
    """What a parallel drafter's `Drafting` shares (module doc): `begin`/`extend` store the round's logits, one row
    per depth, in `round_logits`; `step` reads them."""

    parallel = True
    round_logits: torch.Tensor | None = None  # [draft_depth, V]

    def step(self, tokens: torch.Tensor, parents: torch.Tensor, depth: int, block: torch.Tensor | None) -> torch.Tensor:
        return self.round_logits[depth].expand(len(tokens), -1)


def stop_head_logits(stop_head: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """The stop head's logit per row (drafter.stop_head, trained in distill/drafters/feature.py): a linear probe on
    the RMS-normalised output feature (a residual stream's scale drifts with depth and training; the probe should not
    have to follow it)."""
    return stop_head(F.rms_norm(features, (features.shape[-1],))).squeeze(-1)


class FeatureHead(ABC):
    """A feature-level head's decoding forward. At position i it reads (t_{i+1}, h_i): h_i is `decode_input` of the
    target's features where the target has run, and the head's own output hidden state of position i−1 where it
    drafts."""

    feature_layers: tuple[int, ...]
    stop_head: Callable[[torch.Tensor], torch.Tensor] | None = None  # drafter.stop_head's linear layer, if trained

    @abstractmethod
    def decode_input(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """The per-position hidden input h_i computed from the target's features."""

    @abstractmethod
    def __call__(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
        mask: torch.Tensor | None, last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (output hidden states, fed back at the next position; logits over the target's vocabulary, of every
        row or the last). `mask` as in `distill.lean.LeanLayer.attend`."""


class FeatureDrafting(Drafting):
    """Drafting with a `FeatureHead`: position i holds (t_{i+1}, h_i), so after the target has run positions a..b
    the head commits pairs a..b; drafted entries (computed from the head's own features) are always dropped and
    recomputed from the target's features of the accepted tokens."""

    def __init__(self, head: FeatureHead, device: torch.device | str):
        super().__init__(device)
        self.head = head
        self.feature_layers = tuple(head.feature_layers)
        self.kv_cache = KVCache()
        self.last_hidden: torch.Tensor | None = None  # output rows of the previous call

    @property
    def has_stop_head(self) -> bool:
        return self.head.stop_head is not None

    def acceptance(self) -> float:
        # the logits of the last call were read from its last output row, which the stop head reads too
        return float(torch.sigmoid(stop_head_logits(self.head.stop_head, self.last_hidden[0, -1:]).float()))

    def _run(self, tokens, hidden, positions, mask, last_only: bool = False) -> torch.Tensor:
        self.last_hidden, logits = self.head(tokens, hidden, positions, self.kv_cache, mask, last_only)
        return logits[0]

    def begin(self, prompt_ids, features, first_token):
        self.length = 0
        self.kv_cache.truncate(0)
        return self.extend(torch.cat([prompt_ids[:, 1:], first_token], dim=1), features)

    def extend(self, tokens, features):
        self.kv_cache.truncate(self.length)
        count = tokens.shape[1]
        hidden = self.head.decode_input(features)
        logits = self._run(tokens, hidden, self._positions(count), self._commit_mask(count), last_only=True)
        self.length += count
        self.last_hidden = self.last_hidden[:, -1:]
        return logits[-1]

    def step(self, tokens, parents, depth, block):
        hidden = self.last_hidden[:, parents]
        positions = self._positions(1, depth - 1).expand(1, len(tokens))  # pair (t_{i+1}, h_i) sits at position i
        return self._run(tokens[None], hidden, positions, self._draft_mask(block))
