"""The drafting interface: one `Proposer` per drafter kind, driven by the decoder in eval/decoding.py.

A proposer keeps its own KV cache over the committed sequence and drafts on top of it:

    begin(prompt, features, first)  prefill on the prompt plus the target's first token → logits of the next draft
    step(tokens, parents, depth, block)  feed drafted tokens (a chain link, or one tree level) → their logits
    extend(tokens, features)  drop everything drafted, commit the tokens the target accepted (+ its bonus) →
                              logits of the next draft

`parents` picks, for each fed token, the output row of the previous call that proposed it (EAGLE feeds that row's
hidden state back); `depth` is the tokens' distance from the last committed token (1 = first draft); `block` is the
boolean visibility among drafted entries (None: all of them, as in a chain). Logits are over the target's vocabulary.

- `EagleProposer` (EAGLE-1 / EAGLE-3 heads) reads the target's features of committed positions: position i holds
  (t_{i+1}, h_i), so after the target has run positions a..b it commits pairs a..b.
- `LMProposer` (an independent small LM on the target's tokenizer) reads tokens only: position i holds t_i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from specdistill.distill.drafters.eagle import EagleConfig, EagleDrafter, check_drafter_matches_target
from specdistill.distill.errors import UserError
from specdistill.distill.kv_cache import KVCache
from specdistill.distill.target import FrozenTarget
from specdistill.eval.lean import LeanEagle, lean_causal_lm, lean_target
from specdistill.eval.masks import PrefixMask, as_model_mask, causal_block, check_attention_implementation


class Proposer(ABC):
    feature_layers: tuple[int, ...] = ()  # target layer ids whose features the proposer reads

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

    def _positions(self, count: int, offset: int = 0) -> torch.Tensor:
        return torch.arange(self.length + offset, self.length + offset + count, device=self.device)[None]

    def _commit_mask(self, count: int) -> torch.Tensor | None:
        """Committing `count` tokens after `length` cached ones: causal among them (none needed for one)."""
        return None if count == 1 else self.mask(self.length, causal_block(count, self.device))

    def _draft_mask(self, block: torch.Tensor | None) -> torch.Tensor | None:
        return None if block is None else self.mask(self.length, block)


class EagleProposer(Proposer):
    def __init__(self, drafter: EagleDrafter, device: torch.device | str, target: FrozenTarget | None = None):
        super().__init__(device)
        lean = lean_target(target) if target is not None else None
        self.drafter = LeanEagle(drafter.eval(), lean.lm_head if lean is not None else None)
        self.feature_layers = tuple(drafter.config.feature_layers)
        self.kv_cache = KVCache()
        self.last_hidden: torch.Tensor | None = None  # output rows of the previous call

    def _run(self, tokens, hidden, positions, mask, last_only: bool = False) -> torch.Tensor:
        self.last_hidden, logits = self.drafter(tokens, hidden, positions, self.kv_cache, mask, last_only)
        return logits[0]

    def begin(self, prompt_ids, features, first_token):
        self.length = 0
        self.kv_cache.truncate(0)
        return self.extend(torch.cat([prompt_ids[:, 1:], first_token], dim=1), features)

    def extend(self, tokens, features):
        # drafted entries were computed from the drafter's own features: drop them, recompute from the target's
        self.kv_cache.truncate(self.length)
        count = tokens.shape[1]
        hidden = self.drafter.decode_input(features, self.feature_layers)
        logits = self._run(tokens, hidden, self._positions(count), self._commit_mask(count), last_only=True)
        self.length += count
        self.last_hidden = self.last_hidden[:, -1:]
        return logits[-1]

    def step(self, tokens, parents, depth, block):
        hidden = self.last_hidden[:, parents]
        positions = self._positions(1, depth - 1).expand(1, len(tokens))  # pair (t_{i+1}, h_i) sits at position i
        return self._run(tokens[None], hidden, positions, self._draft_mask(block))


class LMProposer(Proposer):
    """A causal LM that shares the target's tokenizer (a DistillSpec-style token-level drafter). It runs through
    eval/lean.py's forward when that supports the model, otherwise through transformers' modules."""

    def __init__(self, model: nn.Module, device: torch.device | str, lean: bool = True):
        super().__init__(device)
        self.model = model.eval()
        self.lean = lean_causal_lm(model) if lean else None
        if self.lean is None:
            check_attention_implementation(model.config, "drafter")
        self.cache = KVCache()

    def _run(self, tokens, positions, mask, last_only: bool) -> torch.Tensor:
        if self.lean is not None:
            return self.lean(tokens, positions, self.cache, mask, last_logits_only=last_only).logits[0]
        output = self.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=as_model_mask(mask, self.model.config, self.model.dtype),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        return output.logits[0]

    def begin(self, prompt_ids, features, first_token):
        self.length = 0
        self.cache = KVCache(capacity=prompt_ids.shape[1] + 256)
        return self.extend(torch.cat([prompt_ids, first_token], dim=1), features)

    def extend(self, tokens, features):
        self.cache.truncate(self.length)
        count = tokens.shape[1]
        logits = self._run(tokens, self._positions(count), self._commit_mask(count), last_only=True)
        self.length += count
        return logits[-1]

    def step(self, tokens, parents, depth, block):
        positions = self._positions(1, depth - 1).expand(1, len(tokens))  # token t_i sits at position i
        return self._run(tokens[None], positions, self._draft_mask(block), last_only=False)


def load_proposer(
    drafter_path: str, target: FrozenTarget, device: torch.device | str, trust_remote_code: bool = False
) -> Proposer:
    """A `specdistill train` drafter folder (EAGLE-1/-3) or a Hugging Face causal LM folder sharing the target's
    vocabulary (a token-level drafter), ready to draft for `target`."""
    path = Path(drafter_path).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"drafter_path: {path} has no config.json; pass the `drafter` folder that `specdistill train` wrote "
            "(<out_dir>/drafter) or a Hugging Face causal LM folder"
        )
    import specdistill.distill.drafters  # noqa: F401  (registers the drafter classes with the Auto classes)

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if isinstance(config, EagleConfig):
        check_drafter_matches_target(config, target.config, "drafter_path")
        drafter = AutoModel.from_pretrained(path, use_safetensors=True).to(device=device, dtype=target.model.dtype)
        drafter.attach_target(target.embed_tokens, target.lm_head)
        return EagleProposer(drafter, device, target)
    if getattr(config, "vocab_size", None) != target.config.vocab_size:
        raise UserError(
            f"drafter_path: {path} has vocabulary size {getattr(config, 'vocab_size', None)}, the target "
            f"{target.config.vocab_size}; a token-level drafter must share the target's tokenizer"
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=target.model.dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return LMProposer(model.to(device), device)
