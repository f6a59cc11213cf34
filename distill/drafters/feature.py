"""What every feature-level drafter shares: heads that read the frozen target's features and predict its next
features/tokens (EAGLE-1, EAGLE-3, and the kinds built on them). Each kind is one module (eagle1.py, eagle3.py)
with its config, its training loss and its decoding forward; this module holds their common base.

Alignment (EAGLE): tokens t_0..t_{T−1}, target features f_i (position i's hidden state, which predicts t_{i+1}) and
target logits L_i. The drafter at position i reads (t_{i+1}, f_i), outputs the feature of position i+1 and predicts
t_{i+2}; its targets are f_{i+1} and softmax(L_{i+1}); it is trained where loss_mask[i+2] = 1.
The target's embedding (and, where a kind uses it, its LM head) are shared frozen via `attach_target`, never saved.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import torch.nn.functional as F

from specdistill.distill.drafters.modules import RMSNorm, causal_bias, rope_inv_freq, rotary_cos_sin
from specdistill.distill.drafters.registry import kinds_with_stop_head, load_weights_checked, read_drafter_config
from specdistill.distill.drafting import FeatureDrafting, FeatureHead, stop_head_logits
from specdistill.distill.kv_cache import KVCache
from specdistill.distill.lean import LeanLayer, Linear, RotaryTable, position_bound
from specdistill.distill.errors import UserError
from specdistill.distill.objectives import FeatureObjective, HassObjective, uniform_noise
from specdistill.distill.target import FINAL_NORMED, FrozenTarget, check_feature_layers

log = logging.getLogger(__name__)


class FeatureDrafterConfig(PretrainedConfig):
    """Shape of the draft layers (copied from the target's) plus what the drafter needs of its target.
    (transformers v5 configs are dataclasses: fields are declared, not set in `__init__`.)"""

    hidden_size: int = 4096
    num_hidden_layers: int = 1
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    vocab_size: int = 32000
    draft_vocab_size: int | None = None  # EAGLE-3; None: the full vocabulary
    feature_layers: list[int] | None = None  # target layer ids the drafter reads (-1: final normed state)
    target_hidden_size: int | None = None
    target_num_layers: int | None = None
    target_name_or_path: str | None = None
    target_revision: str | None = None
    target_fingerprint: str | None = None  # `target_fingerprint` of the target it was trained on
    stop_head: bool = False  # SpecDec++'s acceptance head (drafter.stop_head; `FeatureDrafter.post_init`)

    def __post_init__(self, **kwargs: Any):
        self.draft_vocab_size = self.draft_vocab_size or self.vocab_size
        self.feature_layers = list(self.feature_layers or [FINAL_NORMED])
        self.target_hidden_size = self.target_hidden_size or self.hidden_size
        super().__post_init__(**kwargs)


@dataclass
class DraftLoss:
    loss_sum: torch.Tensor  # Σ over masked positions (and decayed steps); divide by the batch's num_tokens
    num_tokens: torch.Tensor  # masked positions of step 0
    agree: torch.Tensor  # [ttt_steps] positions where the drafter's argmax equals the target's
    counted: torch.Tensor  # [ttt_steps] positions counted for agreement
    # the stop head's binary cross-entropy, Σ over every step's trained rows (None: no stop head); it trains the stop
    # head only, so train adds it to the backward but not to the reported loss
    stop_loss_sum: torch.Tensor | None = None


def shift_left(x: torch.Tensor, shift: int, fill: float | int = 0) -> torch.Tensor:
    """x moved `shift` places left along the sequence dimension (dim 1), padded at the end with `fill`."""
    if shift == 0:
        return x
    padding = torch.full_like(x[:, :shift], fill)
    return torch.cat([x[:, shift:], padding], dim=1)


def trained_rows(loss_mask: torch.Tensor, step: int = 0) -> torch.Tensor:
    """Where the drafter is trained at unrolled step `step`: position i predicts token i + 2 + step (module doc), so
    it is trained when that token is under the loss mask → a boolean [batch, T − 2 − step] selector of the positions
    that have such a token. The LM head and the losses run on the selected rows only."""
    return loss_mask[:, 2 + step :].bool()


def rows(x: torch.Tensor, offset: int, selected: torch.Tensor) -> torch.Tensor:
    """The rows of x at positions i + offset for the positions i that `selected` marks → [count, ...]."""
    return x[:, offset : offset + selected.shape[1]][selected]


def sequence_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Position ids 0..T−1 for every row of a right-padded batch."""
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)


def draft_config_from_target(
    config_class: type[FeatureDrafterConfig], target_config: Any, feature_layers: Sequence[int], **overrides: Any
) -> FeatureDrafterConfig:
    """A drafter config whose layer shape copies the target's."""
    rope_theta = getattr(target_config, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(target_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    values = dict(
        hidden_size=target_config.hidden_size,
        num_attention_heads=target_config.num_attention_heads,
        num_key_value_heads=getattr(target_config, "num_key_value_heads", target_config.num_attention_heads),
        intermediate_size=target_config.intermediate_size,
        rms_norm_eps=target_config.rms_norm_eps,
        rope_theta=rope_theta,
        max_position_embeddings=target_config.max_position_embeddings,
        vocab_size=target_config.vocab_size,
        feature_layers=list(feature_layers),
        target_hidden_size=target_config.hidden_size,
        target_num_layers=target_config.num_hidden_layers,
        target_name_or_path=getattr(target_config, "_name_or_path", None),
    )
    values.update(overrides)
    return config_class(**values)


def check_drafter_matches_target(drafter_config: FeatureDrafterConfig, target: FrozenTarget, where: str) -> None:
    """A drafter trained for one target cannot serve another: compare the shapes it depends on, then the target's
    weights (`target_fingerprint`), which also tells apart same-shaped targets."""
    target_config = target.config
    checks = [
        ("vocab size", drafter_config.vocab_size, target_config.vocab_size),
        ("hidden size", drafter_config.target_hidden_size, target_config.hidden_size),
        ("number of layers", drafter_config.target_num_layers, target_config.num_hidden_layers),
    ]
    for name, drafter_value, target_value in checks:
        if drafter_value is not None and drafter_value != target_value:
            raise UserError(
                f"{where}: the drafter was built for a target with {name} {drafter_value} "
                f"({drafter_config.target_name_or_path}), but this target has {target_value}. "
                "Use the target the drafter was trained for, or train a new drafter."
            )
    recorded = drafter_config.target_fingerprint
    actual = target_fingerprint(target) if recorded is not None else None
    if recorded != actual:
        raise UserError(
            f"{where}: the drafter was trained on another target of the same shape "
            f"({drafter_config.target_name_or_path}, weights fingerprint {recorded}; this target's is {actual}). "
            "Use the target it was trained for (target.name_or_path, target.revision), or train a new drafter."
        )


def target_fingerprint(target: FrozenTarget) -> str:
    """A hash of a sample of the target's embedding and LM-head rows, rounded to bfloat16 so that the same weights
    loaded in float32 or bfloat16 agree: a drafter records it and refuses a different target of the same shape."""
    digest = hashlib.sha256()
    for weight in (target.embed_tokens.weight, target.lm_head.weight):
        stride = max(1, weight.shape[0] // 64)
        sample = weight.detach()[::stride, :256].to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class BuildContext:
    """What building a fresh drafter may use besides its options: the frozen target and facts about it."""

    target: FrozenTarget
    token_counts: Optional[torch.Tensor] = None  # masked-token frequencies of the training data (prep's token_counts)
    target_name_or_path: Optional[str] = None
    target_revision: Optional[str] = None
    mask_token_id: Optional[int] = None  # the tokenizer's mask token (a parallel drafter's placeholder), if it has one


def choose_mask_token(requested: Optional[int], context: BuildContext, vocab_size: int) -> int:
    """The placeholder token a parallel drafter (P-EAGLE, DFlash) feeds where a draft is yet unknown: `requested`
    (drafter.mask_token_id) if set, else the tokenizer's mask token, else the id the training data uses least (the
    highest among equals: vocabularies keep their rarely used special ids at the end). Its embedding is the target's,
    so any id works once trained with; it is saved in config.json and exported for the engines."""
    if requested is not None:
        if not 0 <= requested < vocab_size:
            raise UserError(f"drafter.mask_token_id={requested} is out of range: it must be a token id in "
                            f"0..{vocab_size - 1} (or null: the tokenizer's mask token, else an unused id)")
        return requested
    if context.mask_token_id is not None:
        log.info("mask token: the tokenizer's, id %d", context.mask_token_id)
        return int(context.mask_token_id)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    if context.token_counts is not None:
        usable = min(len(context.token_counts), vocab_size)
        counts[:usable] = context.token_counts[:usable]
    chosen = int(vocab_size - 1 - torch.argmin(counts.flip(0)))
    log.info("mask token: the tokenizer has none, so id %d (used %d times in the training data); set "
             "drafter.mask_token_id to choose another", chosen, int(counts[chosen]))
    return chosen


class FeatureDrafter(PreTrainedModel):
    """Base of the feature-level kinds. A kind subclass provides (the drafter-unit protocol that train/, eval/ and
    export use through distill.drafters.registry):

        Options                          dataclass: the Hydra schema of conf/drafter/<kind>.yaml
        build(options, context)          a fresh drafter shaped after the target (classmethod)
        training_loss(...) → DraftLoss   its training loss
        hidden_input, unroll_step,       its training forward (`training_draft_logits` runs it as decoding would,
          vocab_logits                   for the parity test of every kind)
        head() → FeatureHead             its decoding forward (distill.drafting), on distill/lean.py's fast ops
    """

    config_class = FeatureDrafterConfig
    base_model_prefix = "drafter"
    _no_split_modules = ["DraftDecoderLayer"]
    Options: type
    # the objective schemas it trains with, by their name in conf/objective's `schema/objective` group; first: default
    Objectives: dict[str, type] = {"feature": FeatureObjective, "hass": HassObjective}
    export_formats: tuple[str, ...] = ()  # the serving-engine layouts `engine_layout` writes (hf is every kind's)
    # engine → the speculative method its serve command names for this kind (vLLM's speculative_config.method,
    # SGLang's --speculative-algorithm), for each of `export_formats` that has one
    speculative_methods: dict[str, str] = {}
    # the deepest draft its `drafting` can make (its `Drafting.max_depth`); None: unbounded. Training checks τ's decoding
    # settings against it before the first step.
    max_depth: int | None = None
    # whether drafter.stop_head applies: the kinds whose loss runs `unrolled_loss`, drafting one token per forward
    supports_stop_head: bool = False

    @classmethod
    def stop_head_field(cls, options: Any) -> dict:
        """The config's stop_head field from the options; one clear error where this kind cannot train one."""
        if options.stop_head and not cls.supports_stop_head:
            raise UserError(f"drafter.stop_head=true: a {options.kind} drafter does not draft one token per forward, "
                            "and the stop head (eval.draft_length=learned) is trained and read along such chains: "
                            f"use drafter={'|'.join(kinds_with_stop_head())}, or set drafter.stop_head=false")
        return {"stop_head": bool(options.stop_head)}

    @classmethod
    def formats_for(cls, config: dict) -> tuple[str, ...]:
        """The engine layouts a saved drafter of this kind exports to, read from its config.json before any weights."""
        return cls.export_formats

    @classmethod
    def default_feature_layers(cls, num_layers: int) -> tuple[int, ...]:
        """The target layers a drafter of this kind with default options reads from a target of `num_layers` layers
        (prep caches them): the final normed state, unless the kind says otherwise."""
        return (FINAL_NORMED,)

    @classmethod
    def recognises(cls, config: dict) -> bool:
        """Whether a drafter folder's config.json is one this kind saved: its own `model_type`."""
        return config.get("model_type") == cls.config_class.model_type

    @classmethod
    def load_drafting(cls, path: Path, target: FrozenTarget, device: torch.device | str,
                      trust_remote_code: bool = False) -> FeatureDrafting:
        """A folder it `recognises` → its drafting interface for `target`, after checking that it fits (its own code
        is specdistill's, so `trust_remote_code` does not apply)."""
        return cls.load_for_target(path, target, device).drafting(device)

    @classmethod
    def load_for_target(cls, path: Path, target: FrozenTarget, device: torch.device | str) -> "FeatureDrafter":
        """A folder it `recognises` → the drafter module, checked against `target`, on `device` in the target's dtype,
        attached to it (what online adaptation trains)."""
        drafter = load_weights_checked(cls, path)
        drafter.check_target(target, "drafter_path")
        drafter = drafter.to(device=device, dtype=target.model.dtype).eval()
        drafter.attach_target(target)
        return drafter

    @classmethod
    def check_objective(cls, objective: Any) -> None:
        """Refuse objective values this kind cannot honour (beyond the schema type `Objectives` checks)."""

    def load_initial_weights(self, path: Any) -> None:
        """Start from the weights of the drafter folder `path` (`init_from=`): same kind, shape and target, or one
        clear message."""
        from safetensors.torch import load_file

        saved = read_drafter_config(path)
        mine = self.identity()
        # a drafter imported from an engine checkpoint (specdistill import) records no target depth or fingerprint:
        # unknown, not different (its shapes, taps and vocabulary are still compared)
        unrecorded = {key for key in ("target_num_layers", "target_fingerprint") if saved.get(key) is None}
        saved = {"stop_head": False, **saved}  # drafters saved before the stop head existed have none
        different = [f"{key} {saved.get(key)!r} there vs {value!r} here" for key, value in mine.items()
                     if key != "target_name_or_path" and key not in unrecorded and saved.get(key) != value]
        if different:
            raise UserError(f"init_from: {path} is another drafter than this run builds ({'; '.join(different)}); "
                            "use the same drafter=, drafter.* options and target as the run that wrote it")
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"init_from: {path} has no model.safetensors; point at a complete drafter folder")
        self.load_state_dict(load_file(str(weights)), strict=True)

    @staticmethod
    def noisy_taps(target: Any, objective: FeatureObjective,
                   generator: torch.Generator | None) -> dict[int, torch.Tensor]:
        """The target's tapped features with EAGLE's U(−noise, noise) augmentation (`objective.noise`)."""
        return {layer_id: uniform_noise(feature, objective.noise, generator)
                for layer_id, feature in target.features.items()}

    def prepare_batch(self, batch: dict, objective: Any, generator: torch.Generator) -> dict:
        """A training micro-batch before the target scores it: unchanged for feature-level heads."""
        return batch

    @classmethod
    def build(cls, options: Any, context: BuildContext) -> "FeatureDrafter":
        raise NotImplementedError

    def engine_tensors(self) -> dict[str, torch.Tensor]:
        """The weights an engine layout starts from: the state dict on the CPU, less the stop head, which no engine
        has (the hf folder keeps it for `specdistill eval`)."""
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()
                if not name.startswith("stop_head.")}

    def post_init(self) -> None:
        """Adds the optional stop head last, so the other modules' initialisation (and so the drafter a seed gives)
        does not depend on it, then initialises the weights. The stop head (SpecDec++): a linear probe on the output
        feature a position's draft is read from, σ(w·x + b) = P(that draft token is accepted), trained by
        `unrolled_loss` on detached inputs and read by `eval.draft_length=learned`."""
        self.stop_head = None
        if self.config.stop_head:
            with torch.random.fork_rng(devices=[]):  # nn.Linear draws its own init: not from the drafter's stream
                self.stop_head = nn.Linear(self.config.hidden_size, 1)
        super().post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def record_target(self, context: BuildContext) -> None:
        """Write what identifies the target into the config (saved with the drafter, checked when it is loaded)."""
        self.config.target_name_or_path = context.target_name_or_path or self.config.target_name_or_path
        self.config.target_revision = context.target_revision
        self.config.target_fingerprint = target_fingerprint(context.target)

    def attach_target(self, target: FrozenTarget) -> None:
        """Share the target's frozen embedding and LM head (held outside the module tree, so never saved)."""
        self.__dict__["_attached_target"] = target

    @property
    def attached_target(self) -> FrozenTarget:
        if "_attached_target" not in self.__dict__:
            raise RuntimeError("call attach_target(target) before using the drafter")
        return self.__dict__["_attached_target"]

    @property
    def target_embed(self) -> nn.Embedding:
        return self.attached_target.embed_tokens

    @property
    def target_lm_head(self) -> nn.Linear:
        return self.attached_target.lm_head

    def check_target(self, target: FrozenTarget, where: str) -> None:
        """One clear message when this drafter cannot serve `target` (shapes, tapped layers, fingerprint)."""
        check_drafter_matches_target(self.config, target, where)
        check_feature_layers(self.feature_layers, target.num_layers, f"{where}: feature_layers")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The target layer ids this drafter reads (FrozenTarget's ids)."""
        return tuple(self.config.feature_layers)

    def trained_rows(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """Positions the loss trains on (the recipe's per-token normaliser counts them before the forward)."""
        return trained_rows(loss_mask)

    def identity(self) -> dict:
        """The config fields a checkpoint must share with this drafter to be resumed into it."""
        keys = ("model_type", "feature_layers", "num_hidden_layers", "hidden_size", "draft_vocab_size", "vocab_size",
                "target_hidden_size", "target_num_layers", "target_name_or_path", "target_fingerprint", "stop_head")
        return {key: getattr(self.config, key, None) for key in keys}

    def unroll_step(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                    bias: torch.Tensor, caches: list[list] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One unrolled training step over (t_{i+1}, h_i) pairs → (what the LM head reads, the feature fed back to
        the next step). `caches` (one list per layer, or None for a single step) holds earlier steps' keys/values and
        receives this step's."""
        raise NotImplementedError

    def unrolled_outputs(self, input_ids: torch.Tensor, hidden: torch.Tensor, bias: torch.Tensor,
                         step_count: int, detach: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training-time test of EAGLE-3, which is also HASS's harmonized context alignment: at step s (HASS's
        pass s + 1) row i reads token t_{i+1+s} at RoPE position i + s, and, in place of a target feature, the
        drafter's own step-(s−1) output of row i; its attention sees the target-fed keys of positions ≤ i (step 0)
        and the keys row i produced at steps 1..s, i.e. the drafter's own features for the s most recent positions,
        exactly what it sees when drafting at depth s + 1. (HASS indexes the same computation by query position
        p = i + s; its passes hand over detached features: `detach`.) Yields (LM-head input, fed-back feature) per
        step."""
        positions = sequence_positions(input_ids)
        caches: list[list] | None = [[] for _ in self.layers] if step_count > 1 else None
        for step in range(step_count):
            if step and detach:
                hidden = hidden.detach()
            token_part, hidden = self.unroll_step(shift_left(input_ids, 1 + step), hidden, positions + step, bias,
                                                  caches)
            yield token_part, hidden

    def unrolled_loss(
        self, input_ids: torch.Tensor, loss_mask: torch.Tensor, hidden: torch.Tensor, bias: torch.Tensor,
        objective: FeatureObjective,
        step_loss: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> DraftLoss:
        """Σ_s weight_s · Σ_rows step_loss over the objective's unrolled steps. `step_loss(step, token rows, fed-back
        rows, selected)` gets the rows trained at that step (position i predicts token i + 2 + step) and returns
        (per-row loss, per-row agreement of the drafter's argmax with the target's). With a stop head: its binary
        cross-entropy against that agreement (the row's draft accepted at greedy, given the prefix), on the detached
        output feature (what decoding feeds back) so the drafter trains exactly as without it, every step weighted
        equally (the estimate must hold at every depth a chain reaches)."""
        weights = objective.step_weights()
        steps = self.unrolled_outputs(input_ids, hidden, bias, len(weights), objective.detach_steps)
        loss_sum, agree, counted = hidden.new_zeros((), dtype=torch.float32), [], []
        stop_loss_sum = None if self.stop_head is None else hidden.new_zeros((), dtype=torch.float32)
        for step, (weight, (token_part, fed_back)) in enumerate(zip(weights, steps)):
            selected = trained_rows(loss_mask, step)
            fed_back_rows = rows(fed_back, 0, selected)
            per_row, agreeing = step_loss(step, rows(token_part, 0, selected), fed_back_rows, selected)
            loss_sum = loss_sum + weight * per_row.sum()
            if self.stop_head is not None:
                stop_logits = stop_head_logits(self.stop_head, fed_back_rows.detach()).float()
                stop_loss_sum = stop_loss_sum + F.binary_cross_entropy_with_logits(
                    stop_logits, agreeing.float(), reduction="sum")
            # counts in float32: bfloat16 rounds integers above 256
            agree.append(agreeing.sum().to(torch.float32).detach())
            counted.append(selected.sum().to(torch.float32))
        return DraftLoss(loss_sum, counted[0], torch.stack(agree), torch.stack(counted), stop_loss_sum)

    def vocab_logits(self, token_part: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary of what the LM head reads (an `unroll_step` output)."""
        raise NotImplementedError

    def training_draft_logits(self, input_ids: torch.Tensor, features: dict[int, torch.Tensor],
                              committed: int) -> torch.Tensor:
        """The training forward run as decoding runs: the target ran positions 0..committed−1 of `input_ids` [1, T]
        (`features`: this drafter's layers there), input_ids[committed] is its own next token and the tokens after it
        are drafts fed one by one → row j (of T − committed): the logits of the token after input_ids[committed + j],
        which the decoding forward gives at draft depth j. The unrolled steps of `unrolled_outputs` are that chain
        (step s of the last committed row reads draft s); rows past the committed ones, which that row never attends
        to, get zero features."""
        hidden = self.hidden_input(features)[:, :committed]
        hidden = F.pad(hidden, (0, 0, 0, input_ids.shape[1] - committed))
        bias = causal_bias(torch.ones_like(input_ids), hidden.dtype)
        steps = self.unrolled_outputs(input_ids, hidden, bias, input_ids.shape[1] - committed, detach=False)
        return torch.stack([self.vocab_logits(token_part[0, committed - 1]) for token_part, _ in steps])

    def drafting(self, device: torch.device | str) -> FeatureDrafting:
        """The drafting interface the evaluator drives (after `attach_target`)."""
        return FeatureDrafting(self.head(), device)

    def head(self) -> Any:
        raise NotImplementedError

    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        return rotary_cos_sin(position_ids, head_dim, self.config.rope_theta, dtype)


@dataclass
class FeatureDrafterOptions:
    """Options every feature-level kind shares (conf/drafter/<kind>.yaml)."""

    kind: str = "?"  # the registered kind name: each kind's options set it as their default (register_kind checks)
    num_layers: int = 1  # decoder layers in the drafter
    # target layer ids read (input of layer i; -1: the final normed state); None: the kind's default
    feature_layers: Optional[list[int]] = None
    # SpecDec++'s stop head: a learned P(draft accepted), trained beside the drafter (which it leaves unchanged),
    # read by `eval.draft_length=learned`; the kinds that draft one token per forward (EAGLE-1, EAGLE-3, FSPAD, HASS)
    stop_head: bool = False


class LeanFeatureHead(FeatureHead):
    """What every feature-level head's decoding forward starts from, copied from the trained modules onto the fast
    ops of distill/lean.py: the target's embedding, `fc`, the decoder layers and a rotary table. Build it after
    loading (the weights are copied)."""

    def __init__(self, drafter: FeatureDrafter):
        config = drafter.config
        head_dim = config.hidden_size // config.num_attention_heads
        self.feature_layers = drafter.feature_layers
        with torch.no_grad():
            self.embed = drafter.target_embed.weight.detach()
            self.fc = Linear(drafter.fc.weight, drafter.fc.bias)
            self.layers = [LeanLayer.from_layer(layer, config, head_dim) for layer in drafter.layers]
            stop_head = drafter.stop_head
            self.stop_head = None if stop_head is None else Linear(stop_head.weight, stop_head.bias)
        self.vocab_size, self.eps = config.vocab_size, config.rms_norm_eps
        self.rotary = RotaryTable(rope_inv_freq(head_dim, config.rope_theta, self.embed.device), 1.0, self.embed.dtype)

    def embed_and_rotary(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                         cache: KVCache) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The fed tokens' embeddings (in the hidden states' dtype) and the rotary angles of their positions."""
        embeds = F.embedding(input_ids, self.embed).to(hidden.dtype)
        return embeds, self.rotary(position_ids, position_bound(cache, input_ids))
