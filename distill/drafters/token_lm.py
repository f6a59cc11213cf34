"""Token-level drafters: an independent causal LM on the target's tokenizer (DistillSpec-style), which reads tokens
only: position i holds t_i. Any Hugging Face causal LM folder whose vocabulary matches the target's drafts this way;
it decodes through distill/lean.py's forward when that supports the model, otherwise through transformers' modules.
"""

from __future__ import annotations

from pathlib import Path
import torch
from torch import nn

from specdistill.distill.drafting import Drafting
from specdistill.distill.errors import UserError
from specdistill.distill.kv_cache import KVCache
from specdistill.distill.lean import lean_causal_lm
from specdistill.distill.masks import as_model_mask, check_attention_implementation
from specdistill.distill.target import FrozenTarget


class LMDrafting(Drafting):
    def __init__(self, model: nn.Module, device: torch.device | str, lean: bool = True):
        super().__init__(device)
        self.causal_lm = model.eval()
        self.lean = lean_causal_lm(model) if lean else None
        if self.lean is None:
            check_attention_implementation(model.config, "drafter")
        self.cache = KVCache()

    def _run(self, tokens, positions, mask, last_only: bool) -> torch.Tensor:
        if self.lean is not None:
            return self.lean(tokens, positions, self.cache, mask, last_logits_only=last_only).logits[0]
        output = self.causal_lm(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=as_model_mask(mask, self.causal_lm.config, self.causal_lm.dtype),
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


def load_causal_lm_drafting(path: Path, model_type: str, target: FrozenTarget, device: torch.device | str,
                            trust_remote_code: bool = False) -> LMDrafting:
    """A Hugging Face causal LM folder as a token-level drafter, checked to be a causal LM on the target's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from specdistill.distill.drafters.registry import load_weights_checked

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"drafter_path: {path}: model_type {model_type!r} is neither a specdistill drafter nor a "
                        f"model transformers knows ({type(error).__name__}); train a drafter with `specdistill train` "
                        "or pass a causal LM folder (set target.trust_remote_code=true only for code you trust)") from None
    causal_lm_class = AutoModelForCausalLM._model_mapping.get(type(config), None) if not trust_remote_code else None
    saved_as = getattr(config, "architectures", None) or []
    # a folder saved from an encoder (e.g. BertModel) maps onto a causal-LM class too, but holds no LM head for it
    is_causal_lm = trust_remote_code or (causal_lm_class is not None
                                         and (not saved_as or causal_lm_class.__name__ in saved_as))
    if not is_causal_lm:
        raise UserError(f"drafter_path: {path} holds a {model_type!r} model, which is not a causal language model; "
                        "a token-level drafter must generate text (e.g. a small Llama/Qwen on the target's tokenizer)")
    if getattr(config, "vocab_size", None) != target.config.vocab_size:
        raise UserError(
            f"drafter_path: {path} has vocabulary size {getattr(config, 'vocab_size', None)}, the target "
            f"{target.config.vocab_size}; a token-level drafter must share the target's tokenizer"
        )
    model = load_weights_checked(AutoModelForCausalLM, path, dtype=target.model.dtype,
                                 trust_remote_code=trust_remote_code)
    return LMDrafting(model.to(device), device)

