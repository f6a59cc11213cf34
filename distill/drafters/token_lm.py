"""Token-level drafters (`drafter=token_lm`, DistillSpec / GKD): an independent causal LM on the target's tokenizer,
which reads tokens only (position i holds t_i and predicts t_{i+1}). `specdistill train` fits its next-token
distribution q to the frozen target's p with one divergence of distill/objectives.py (`TokenObjective`: forward KL,
reverse KL, JSD(β), TVD, or plain cross-entropy on the data), on the prepared data or, for a share λ of the
micro-batches, on responses the drafter samples itself (GKD's on-policy data; the target scores them in the same
step). 1 − TVD(p, q) is the per-token acceptance probability of speculative sampling.

The trained drafter is saved as a plain Hugging Face causal LM folder, so `AutoModelForCausalLM`, transformers'
assisted generation and `specdistill eval drafter_path=<out>/drafter` all load it; any causal LM folder whose
vocabulary matches the target's drafts this way. It decodes through distill/lean.py's forward when that supports the
model, otherwise through transformers' modules.

    specdistill train drafter=token_lm data_dir=...                                   # forward KL, a fresh 2-layer LM
    specdistill train drafter=token_lm objective=tvd data_dir=...                     # maximise per-token acceptance
    specdistill train drafter=token_lm drafter.init=target_prefix drafter.num_layers=2 data_dir=...
    specdistill train drafter=token_lm drafter.init=pretrained drafter.name_or_path=<small LM, same tokenizer> ...
    specdistill train drafter=token_lm objective=tvd objective.data_source=on_policy objective.on_policy_fraction=0.5
    # ↑ GKD's mix: half the micro-batches take responses the drafter samples (objective.on_policy_tokens of them)
    specdistill eval drafter_path=<out_dir>/drafter ...
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from specdistill.distill.drafters.feature import BuildContext, DraftLoss
from specdistill.distill.drafters.registry import (kind_of_model_type, load_weights_checked, read_drafter_config,
                                                   register_kind)
from specdistill.distill.drafting import Drafting
from specdistill.distill.errors import UserError
from specdistill.distill.kv_cache import KVCache, cache_argument
from specdistill.distill.lean import lean_causal_lm
from specdistill.distill.masks import as_model_mask, check_attention_implementation
from specdistill.distill.objectives import DataSource, Divergence, TokenObjective, top1_agreement
from specdistill.distill.target import FrozenTarget, TargetOutput

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class LMDrafting(Drafting):
    def __init__(self, model: nn.Module, device: torch.device | str, lean: bool = True):
        super().__init__(device)
        self.assistant_model = model.eval()
        self.lean = lean_causal_lm(model) if lean else None
        if self.lean is None:
            check_attention_implementation(model.config, "drafter")
        self.cache = KVCache()

    def _run(self, tokens, positions, mask, last_only: bool) -> torch.Tensor:
        if self.lean is not None:
            return self.lean(tokens, positions, self.cache, mask, last_logits_only=last_only).logits[0]
        output = self.assistant_model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=as_model_mask(mask, self.assistant_model.config, self.assistant_model.dtype),
            **cache_argument(self.assistant_model, self.cache),
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


def first_line(error: BaseException) -> str:
    """An exception's first line, for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_causal_lm(config: PretrainedConfig, source: Any, where: str, vocab_size: int,
                    trust_remote_code: bool = False) -> None:
    """One clear message when the model `config` describes cannot be a token-level drafter: not a causal LM (a folder
    saved from an encoder, e.g. BertModel, maps onto a causal-LM class too, but holds no LM head for it), or a
    vocabulary other than the target's."""
    causal_lm_class = AutoModelForCausalLM._model_mapping.get(type(config), None) if not trust_remote_code else None
    saved_as = getattr(config, "architectures", None) or []
    is_causal_lm = trust_remote_code or (causal_lm_class is not None
                                         and (not saved_as or causal_lm_class.__name__ in saved_as))
    if not is_causal_lm:
        raise UserError(f"{where}: {source} holds a {config.model_type!r} model, which is not a causal language model; "
                        "a token-level drafter must generate text (e.g. a small Llama/Qwen on the target's tokenizer)")
    if getattr(config, "vocab_size", None) != vocab_size:
        raise UserError(f"{where}: {source} has vocabulary size {getattr(config, 'vocab_size', None)}, the target "
                        f"{vocab_size}; a token-level drafter must share the target's tokenizer")


def load_causal_lm_drafting(path: Path, model_type: str, target: FrozenTarget, device: torch.device | str,
                            trust_remote_code: bool = False) -> LMDrafting:
    """A Hugging Face causal LM folder as a token-level drafter, checked to be a causal LM on the target's vocabulary."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"drafter_path: {path}: model_type {model_type!r} is neither a specdistill drafter nor a "
                        f"model transformers knows ({type(error).__name__}); train a drafter with `specdistill train` "
                        "or pass a causal LM folder (set target.trust_remote_code=true only for code you trust)") from None
    check_causal_lm(config, path, "drafter_path", target.config.vocab_size, trust_remote_code)
    model = load_weights_checked(AutoModelForCausalLM, path, dtype=target.model.dtype,
                                 trust_remote_code=trust_remote_code)
    return LMDrafting(model.to(device), device)


def load_checked_causal_lm(source: Any, where: str, vocab_size: int, revision: Optional[str] = None,
                           trust_remote_code: bool = False) -> PreTrainedModel:
    """A local folder or Hub name as a float32 causal LM on a `vocab_size` vocabulary, or one clear message."""
    hint = "pass a causal LM folder or Hub name on the target's tokenizer"
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{where}: cannot read {source} as a model ({type(error).__name__}: {first_line(error)}); "
                        f"{hint} (trust_remote_code=true only for code you trust)") from None
    check_causal_lm(config, source, where, vocab_size, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code,
                                                    dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{where}: cannot load the weights of {source} ({first_line(error)}); {hint}") from None


# ---------------------------------------------------------------------------------------------------------------
# drafter=token_lm: options and the three ways to start


class Init(Enum):
    config = "config"  # a fresh, randomly initialised LM of the target's architecture (shape: the options below)
    target_prefix = "target_prefix"  # copies of the target's embeddings, first num_layers layers, final norm, LM head
    pretrained = "pretrained"  # any causal LM (name_or_path) whose vocabulary is the target's


@dataclass
class TokenLMOptions:
    """conf/drafter/token_lm.yaml. The shape keys apply to init=config; None keeps the target's value."""

    kind: str = "token_lm"
    init: Init = Init.config
    num_layers: int = 2  # decoder layers (init=config and target_prefix; a pretrained LM keeps its own)
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    name_or_path: Optional[str] = None  # init=pretrained: a local folder or Hub name
    revision: Optional[str] = None  # init=pretrained: a Hub branch, tag or commit
    trust_remote_code: bool = False  # init=pretrained: run the model's own code from its folder (only code you trust)


def check_options(options: TokenLMOptions, target_config: PretrainedConfig) -> None:
    """One clear message naming the key of a misconfigured drafter."""
    init = options.init
    if init is Init.pretrained and not options.name_or_path:
        raise UserError("drafter.name_or_path: drafter.init=pretrained starts from an existing causal LM; set "
                        "drafter.name_or_path to its local folder or Hub name")
    for key in ("name_or_path", "revision"):
        if init is not Init.pretrained and getattr(options, key) is not None:
            raise UserError(f"drafter.{key}: only drafter.init=pretrained reads it (init is {init.value}); set "
                            f"drafter.init=pretrained or remove drafter.{key}")
    for key in SHAPE_KEYS:
        value = getattr(options, key)
        if value is not None and init is not Init.config:
            owner = "target" if init is Init.target_prefix else "pretrained model"
            raise UserError(f"drafter.{key}: drafter.init={init.value} keeps the {owner}'s shapes; remove "
                            f"drafter.{key} or use drafter.init=config")
        if value is not None and value < 1:
            raise UserError(f"drafter.{key}: {value} is not a positive size")
    if init is Init.pretrained:
        return
    if options.num_layers < 1:
        raise UserError(f"drafter.num_layers: {options.num_layers}; a drafter needs at least 1 decoder layer")
    if init is Init.target_prefix and options.num_layers > target_config.num_hidden_layers:
        depth = target_config.num_hidden_layers
        raise UserError(f"drafter.num_layers: {options.num_layers} layers cannot be copied from a target with {depth}; "
                        f"set drafter.num_layers ≤ {depth}")
    hidden, heads, kv_heads = drafter_shape(options, target_config)
    if hidden % heads:
        raise UserError(f"drafter.hidden_size: {hidden} is not divisible by the {heads} attention heads "
                        "(drafter.num_attention_heads, the target's when unset); choose sizes that divide")
    if heads % kv_heads:
        raise UserError(f"drafter.num_key_value_heads: the {heads} attention heads are not a multiple of {kv_heads} "
                        "key/value heads (the target's when unset); set drafter.num_key_value_heads to a divisor of "
                        f"{heads}")


def drafter_shape(options: TokenLMOptions, target_config: PretrainedConfig) -> tuple[int, int, int]:
    """(hidden size, attention heads, key/value heads) of the drafter init=config builds."""
    heads = options.num_attention_heads or target_config.num_attention_heads
    kv_heads = options.num_key_value_heads or getattr(target_config, "num_key_value_heads", None) or heads
    return options.hidden_size or target_config.hidden_size, heads, kv_heads


def small_config(target_config: PretrainedConfig, options: TokenLMOptions) -> PretrainedConfig:
    """The target's config, cut to `num_layers` decoder layers (and resized by the shape options, init=config)."""
    values = target_config.to_dict()
    values["num_hidden_layers"] = options.num_layers
    for key in PER_LAYER_KEYS:
        if isinstance(values.get(key), list):
            values[key] = values[key][: options.num_layers]
    if options.init is Init.config:
        hidden, heads, kv_heads = drafter_shape(options, target_config)
        resized = options.hidden_size is not None or options.num_attention_heads is not None
        values.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=options.intermediate_size or target_config.intermediate_size)
        if resized and "head_dim" in values:  # a target's explicit head size does not fit other shapes
            values["head_dim"] = hidden // heads
    values.update(dtype="float32", _name_or_path="")
    return type(target_config).from_dict(values)


def copy_target_prefix(model: PreTrainedModel, target_model: PreTrainedModel) -> None:
    """Copy the target's weights into every parameter of `model`, which has the target's names and shapes for its
    fewer layers (embeddings, layers 0..k−1, final norm, LM head): copies, so training the drafter leaves the target
    as it is."""
    source = target_model.state_dict()
    with torch.no_grad():
        model.load_state_dict({name: source[name] for name in model.state_dict()}, strict=True)


def token_ids_only(generation_config: GenerationConfig) -> GenerationConfig:
    """The special token ids of `generation_config` and nothing else: a drafter's saved generation_config carries no
    sampling defaults (a pretrained LM's do_sample/top_p would leak into assisted generation and on-policy sampling)."""
    return GenerationConfig(**{key: getattr(generation_config, key, None) for key in TOKEN_ID_KEYS})


def stop_ids(generation_config: GenerationConfig) -> list[int]:
    """The EOS ids sampling stops at (none: sampling runs to its length)."""
    eos = generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


# ---------------------------------------------------------------------------------------------------------------
# On-policy data (GKD): the drafter samples the responses, the target scores them in the same training step


def sample_continuations(model: nn.Module, prompts: list[torch.Tensor], num_tokens: int, temperature: float,
                         stops: list[int], pad_id: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Up to `num_tokens` tokens sampled from `model` after each prompt (left-padded into one batch, one KV cache),
    each row ending at its first stop id (kept). temperature 0: greedy. Randomness comes from `generator` only, so
    the same generator state gives the same samples."""
    device, count = prompts[0].device, len(prompts)
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((count, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    device_generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(stops, dtype=torch.long, device=device)
    sampled = torch.full((count, num_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(count, dtype=torch.long, device=device)
    done = torch.zeros(count, dtype=torch.bool, device=device)
    cache = KVCache(capacity=width + num_tokens)
    for step in range(num_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_argument(model, cache),
                       use_cache=True, logits_to_keep=1).logits[:, -1].float()
        if temperature > 0:
            token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=device_generator)[:, 0]
        else:
            token = logits.argmax(-1)
        sampled[:, step] = torch.where(done, pad_id, token)
        lengths += (~done).long()
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return [sampled[row, : lengths[row]] for row in range(count)]


def first_masked(loss_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the first position under the loss mask; −1 for a row with none."""
    has_any = loss_mask.bool().any(dim=1)
    return torch.where(has_any, loss_mask.bool().int().argmax(dim=1), -1)


def right_padded(rows: list[tuple[torch.Tensor, torch.Tensor]], like: dict[str, torch.Tensor],
                 pad_id: int) -> dict[str, torch.Tensor]:
    """(token ids, loss mask) per row → a right-padded batch with the keys, dtypes and device of `like`."""
    length = max(len(ids) for ids, _ in rows)
    batch = {key: torch.zeros(len(rows), length, dtype=like[key].dtype, device=like[key].device)
             for key in ("input_ids", "attention_mask", "loss_mask")}
    batch["input_ids"].fill_(pad_id)
    for row, (ids, loss_mask) in enumerate(rows):
        batch["input_ids"][row, : len(ids)] = ids
        batch["attention_mask"][row, : len(ids)] = 1
        batch["loss_mask"][row, : len(ids)] = loss_mask
    return batch


# ---------------------------------------------------------------------------------------------------------------
# The kind


class TokenLMDrafter(nn.Module):
    """drafter=token_lm: `self.model` is a plain Hugging Face causal LM (no specdistill config class, so its saved
    folders load as plain causal LMs everywhere). Position i predicts token i + 1, trained where that token is under
    the loss mask, against the target's distribution at the same position."""

    Options = TokenLMOptions
    Objectives = {"token": TokenObjective}  # feature.py's protocol: by their schema/objective name
    export_formats = ("vllm",)  # its folder as it is: what vLLM's draft-model mode loads (hf is every kind's)
    speculative_methods = {"vllm": "draft_model"}
    max_depth: int | None = None  # a causal LM drafts as deep as asked

    def __init__(self, model: PreTrainedModel, trust_remote_code: bool = False):
        super().__init__()
        self.model = model
        self.trust_remote_code = trust_remote_code  # its folders hold the model's own code (init=pretrained)

    @classmethod
    def check_objective(cls, objective: TokenObjective) -> None:
        """Values the objective schema accepts but training could not use (each would fail mid-run)."""
        if objective.divergence is Divergence.jsd and not 0 < objective.beta < 1:
            raise UserError(f"objective.beta: {objective.beta}; JSD(β) needs 0 < β < 1 (objective=fkl / rkl are its "
                            "limits)")
        if objective.on_policy_tokens < 1:
            raise UserError(f"objective.on_policy_tokens: {objective.on_policy_tokens}; the drafter samples at least "
                            "1 token per on-policy response")
        if objective.on_policy_temperature < 0:
            raise UserError(f"objective.on_policy_temperature: {objective.on_policy_temperature}; use ≥ 0 "
                            "(0: greedy)")

    @classmethod
    def formats_for(cls, config: dict) -> tuple[str, ...]:
        return cls.export_formats

    @classmethod
    def default_feature_layers(cls, num_layers: int) -> tuple[int, ...]:
        """No target layers: a token-level drafter reads tokens only."""
        return ()

    @classmethod
    def recognises(cls, config: dict) -> bool:
        """Any folder no kind with a model_type of its own saved: a Hugging Face causal LM (`load_drafting` says why
        any other folder cannot draft), as transformers' assisted generation takes it."""
        return kind_of_model_type(config.get("model_type")) is None

    @classmethod
    def load_drafting(cls, path: Path, target: FrozenTarget, device: torch.device | str,
                      trust_remote_code: bool = False) -> LMDrafting:
        return load_causal_lm_drafting(path, read_drafter_config(path)["model_type"], target, device,
                                       trust_remote_code)

    @classmethod
    def build(cls, options: TokenLMOptions, context: BuildContext) -> "TokenLMDrafter":
        target_model = context.target.model
        check_options(options, target_model.config)
        if options.init is Init.pretrained:
            model = load_checked_causal_lm(options.name_or_path, "drafter.name_or_path", target_model.config.vocab_size,
                                           options.revision, options.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_config(small_config(target_model.config, options), dtype=torch.float32)
            if options.init is Init.target_prefix:
                copy_target_prefix(model, target_model)
        model.generation_config = token_ids_only(target_model.generation_config)
        return cls(model, options.init is Init.pretrained and options.trust_remote_code)

    def check_target(self, target: FrozenTarget, where: str) -> None:
        """The drafter's logits and the target's must range over one vocabulary."""
        mine, theirs = self.model.config.vocab_size, target.config.vocab_size
        if mine != theirs:
            raise UserError(f"{where}: the token-level drafter has vocabulary size {mine}, the target {theirs}; it "
                            "must share the target's tokenizer")

    def load_initial_weights(self, path: Path) -> None:
        """Start from the weights of the causal LM folder `path` (`init_from=`): the same shapes, or one clear
        message."""
        source = load_checked_causal_lm(path, "init_from", self.model.config.vocab_size,
                                        trust_remote_code=self.trust_remote_code).state_dict()
        mine = self.model.state_dict()
        different = sorted(name for name in mine.keys() | source.keys()
                           if name not in mine or name not in source or mine[name].shape != source[name].shape)
        if different:
            raise UserError(f"init_from: {path} has other weights than this run's drafter (e.g. {different[0]}); use "
                            "the same drafter.* options and target as the run that wrote it")
        self.model.load_state_dict(source)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.default_feature_layers(self.model.config.num_hidden_layers)

    def trained_rows(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """Position i predicts token i + 1: trained when that token is under the loss mask → [batch, T − 1]."""
        return loss_mask[:, 1:].bool()

    def prepare_batch(self, batch: dict[str, torch.Tensor], objective: TokenObjective,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
        """GKD's data mix: with probability λ (objective.on_policy_fraction) the responses of this micro-batch are the
        drafter's own samples; otherwise the batch as it is."""
        if objective.data_source is not DataSource.on_policy:
            return batch
        if not float(torch.rand(1, generator=generator)) < objective.on_policy_fraction:
            return batch
        return self.on_policy_batch(batch, objective, generator)

    @torch.no_grad()
    def on_policy_batch(self, batch: dict[str, torch.Tensor], objective: TokenObjective,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Each row's prompt (the tokens before its first loss-masked one) followed by up to `on_policy_tokens` tokens
        the drafter samples (to its first EOS), trained on the sampled ones; a row without a masked token after
        position 0 is kept as it is."""
        starts, lengths = first_masked(batch["loss_mask"]).tolist(), batch["attention_mask"].sum(dim=1).tolist()
        kept = {row: (batch["input_ids"][row, :length], batch["loss_mask"][row, :length])
                for row, (start, length) in enumerate(zip(starts, lengths)) if start < 1}
        prompted = [row for row in range(len(starts)) if row not in kept]
        if not prompted:
            return batch
        generation = self.model.generation_config
        pad_id = generation.pad_token_id if generation.pad_token_id is not None else 0
        was_training = self.model.training
        self.model.eval()
        try:
            responses = sample_continuations(self.model, [batch["input_ids"][row, : starts[row]] for row in prompted],
                                             objective.on_policy_tokens, objective.on_policy_temperature,
                                             stop_ids(generation), pad_id, generator)
        finally:
            self.model.train(was_training)
        rows = dict(kept)
        for row, response in zip(prompted, responses):
            prompt = batch["input_ids"][row, : starts[row]]
            rows[row] = (torch.cat([prompt, response]),
                         torch.cat([torch.zeros_like(prompt), torch.ones_like(response)]))
        return right_padded([rows[row] for row in range(len(starts))], batch, pad_id)

    def training_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                      target: TargetOutput, objective: TokenObjective) -> DraftLoss:
        """Σ over trained positions of the objective's divergence between the drafter's and the target's next-token
        distributions, and the drafter's top-1 agreement with the target there."""
        selected = self.trained_rows(loss_mask)
        # the model's own forward (not its decoder + LM head), so logit scaling or soft-capping counts as in decoding
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        draft_rows, target_rows = logits[:, :-1][selected], target.logits[:, :-1][selected]
        per_row = objective.per_position(draft_rows, target_rows, input_ids[:, 1:][selected])
        counted = selected.sum().float()
        agree = top1_agreement(draft_rows.detach(), target_rows).sum()
        return DraftLoss(per_row.sum(), counted, agree.reshape(1), counted.reshape(1))

    def identity(self) -> dict:
        """The config fields a checkpoint must share with this drafter to be resumed into it."""
        keys = ("model_type", "vocab_size", "num_hidden_layers", "hidden_size", *SHAPE_KEYS[1:])
        return {key: getattr(self.model.config, key, None) for key in keys}

    def save_pretrained(self, folder: Any, state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """A plain causal LM folder (config.json, generation_config.json, weights). `state_dict`: this module's (keys
        under `model.`), e.g. gathered from ZeRO-3 / FSDP shards."""
        if state_dict is not None:
            state_dict = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
        self.model.save_pretrained(folder, state_dict=state_dict, **kwargs)

    def training_draft_logits(self, input_ids: torch.Tensor, features: dict[int, torch.Tensor],
                              committed: int) -> torch.Tensor:
        """feature.py's protocol: position i predicts token i + 1 whether the target or the drafter chose token i, so
        row j is the model's own forward at position committed + j."""
        return self.model(input_ids=input_ids, use_cache=False).logits[0, committed:]

    def drafting(self, device: torch.device | str) -> LMDrafting:
        return LMDrafting(self.model, device)


register_kind("token_lm", TokenLMDrafter)
