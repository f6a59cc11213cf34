"""The offline feature cache: what the drafters' losses read of the frozen target, computed once by
`specdistill prep features.cache=true` (data_prep/features.py) and read back by `specdistill train
features.source=cache` (`FeatureCache`), so training never runs the target's forward.

Position rules, derived from the losses (t_i tokens, L a record's last loss-masked position; the drafter at row i
reads (t_{i+1}, f_i) and predicts t_{i+2}, distill/drafters/feature.py's module doc):

  features, every cached layer: positions 0 … L−1 (`context`)
    - feature.py `trained_rows`: `loss_mask[:, 2 + step:]`, so row i is trained at unrolled step s iff
      loss_mask[i + 2 + s] = 1: the last trained row is L − 2 (step 0).
    - feature.py `unrolled_outputs` / modules.py `causal_bias`: row i attends to the step-0 rows ≤ i (and to its own
      later steps), so the input features are read at every row 0 … L − 2, prompt and user turns included; rows
      after it never reach a trained row.
    - eagle1.py `step_loss`: `rows(features, 1 + step, selected)` regresses the feature at i + 1 + s ≤ L − 1 (FSPAD
      and HASS on EAGLE-1 share this loss).
    - eagle3.py `training_loss`: the taps go through `fuse` at every row, read at rows ≤ L − 2.
    - medusa.py `training_loss`: `rows(features, 0, selected)`, rows t ≤ L − 2.
    EAGLE-1 may read any one layer (drafter.feature_layers), so the rule is the same for every layer.
  logits: positions p with loss_mask[p + 1] = 1 (`logits`), all ≤ L − 1
    - eagle1.py `step_loss`: `rows(target.logits, 1 + step, selected)`, p = i + 1 + s with loss_mask[p + 1] = 1.
    - eagle3.py `training_loss`: `rows(target_probs | restricted | argmax_in_vocab | target_argmax, 1 + step,
      selected)`, the same p (its softmax and argmax run at every position, but only these rows are read).
    - medusa.py: `rows(target.logits, 1 + k, selected)`, the same p.
    - token_lm.py: `target.logits[:, :-1][loss_mask[:, 1:]]`, the same p (p = 0 included).
    Logits are not stored: the final normed state (layer −1, the LM head's input) is, and the reader recomputes
    `target.lm_head(final normed)` there (exact in fp32). When −1 is a cached layer its context rows hold them
    (`logits` ⊂ `context`); otherwise layer −1 is stored at the logits positions only.
  layer 0, the input of the first decoder layer, is the token embedding in Llama-like targets: when prep finds the
    target's layer-0 input equal to `embed_tokens(input_ids)`, it is recomputed here, not stored (`embedding`).
  Padding and positions after L − 1 are never stored; the reader gives zeros there, which no loss reads.

A record truncated by train.max_length needs a prefix of its stored rows, so the reader applies the same rules to
the batch's (truncated) loss mask and takes that many rows. Refused: objective.data_source=on_policy (token_lm),
whose sampled responses the live target must score.

Layout of <prep out_dir>/features/:

    plan.json                    what is being written: a re-run with the same plan continues it, another restarts
    <split>-<NNNNN>.safetensors  records [start, end) of a split, written to a temporary name and renamed:
                                 `layer.<id>` [rows, hidden] (float32 | bfloat16 | float8_e4m3fn),
                                 `layer.<id>.scale` [rows] bfloat16 (fp8: row = q × scale, scale = row amax / 448),
                                 `offsets.<rule>` int64 [records + 1] (where each record's rows start)
    checksums.json               the size and sha256 of every finished shard, taken from the written file before
                                 its rename, so an interrupted write keeps only the shards that still match
    manifest.json                the plan, every shard's size and sha256 and the measured bytes per token; written
                                 last, so a folder without it is not a cache

Both stages verify every shard's size and sha256 against the manifest: a re-run of prep rewrites the shards that
fail, train refuses them. A manifest without sha256 (written before they were recorded) is checked by size only,
and the next run of its prep command records them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from specdistill.distill.errors import UserError
from specdistill.distill.objectives import DataSource
from specdistill.distill.target import FINAL_NORMED, FrozenTarget

FORMAT = "specdistill-feature-cache"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
CHECKSUMS = "checksums.json"
CONTEXT, LOGITS, EMBEDDING = "context", "logits", "embedding"  # position rules (module doc)
ARGMAX = "argmax"  # the target's argmax token at the logits positions (int32)
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0  # the largest float8_e4m3fn value
SCALE_BYTES = 2  # fp8's per-row bfloat16 scale
log = logging.getLogger(__name__)


def stored_positions(rule: str, loss_mask: torch.Tensor) -> torch.Tensor:
    """The ascending positions whose rows a record stores under `rule` (module doc), from its loss mask [T]."""
    masked = loss_mask.nonzero()[:, 0]
    last = int(masked[-1]) if len(masked) else 0
    if rule == CONTEXT:
        return torch.arange(last)
    return loss_mask[1 : last + 1].nonzero()[:, 0]  # p with loss_mask[p + 1] = 1


def record_row_counts(split: Any) -> dict[str, np.ndarray]:
    """How many rows each record of a dataset split stores under each rule (the lengths of `stored_positions`), from
    the Arrow loss-mask column without decoding rows: context = the last masked position, logits = the masked
    positions after position 0."""
    import pyarrow.compute as pc

    counts: dict[str, list[np.ndarray]] = {CONTEXT: [], LOGITS: []}
    for chunk in split.data.column("loss_mask").chunks:
        lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64)
        masked = chunk.flatten().to_numpy(zero_copy_only=False) != 0
        owner = np.repeat(np.arange(len(lengths)), lengths)
        position = np.arange(len(masked)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        last = np.zeros(len(lengths), np.int64)
        np.maximum.at(last, owner[masked], position[masked])
        at_zero = np.bincount(owner[masked & (position == 0)], minlength=len(lengths))
        counts[CONTEXT].append(last)
        counts[LOGITS].append(np.bincount(owner[masked], minlength=len(lengths)) - at_zero)
    return {rule: np.concatenate(parts) if parts else np.zeros(0, np.int64) for rule, parts in counts.items()}


def dataset_fingerprint(dataset: Any) -> dict[str, dict]:
    """Per split: records, tokens and a hash of its lengths, input_ids and loss_mask (the stored positions depend on
    the mask too), read from the Arrow columns, so a cache is never paired with another dataset."""
    import pyarrow.compute as pc

    result = {}
    for name in sorted(dataset.keys()):
        table = dataset[name].data
        digests = {key: hashlib.sha256() for key in ("lengths", "input_ids", "loss_mask")}
        tokens = 0
        for column, dtype in (("input_ids", "<i4"), ("loss_mask", "<i1")):
            for chunk in table.column(column).chunks:
                if column == "input_ids":
                    lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False).astype("<i8")
                    digests["lengths"].update(lengths.tobytes())
                    tokens += int(lengths.sum())
                digests[column].update(chunk.flatten().to_numpy(zero_copy_only=False).astype(dtype).tobytes())
        combined = hashlib.sha256("".join(digest.hexdigest() for digest in digests.values()).encode())
        result[name] = {"records": len(dataset[name]), "tokens": tokens, "sha256": combined.hexdigest()[:16]}
    return result


def row_bytes(dtype_name: str, hidden_size: int) -> int:
    """Bytes of one stored row (one position of one layer) in the cache's dtype, with fp8's scale."""
    element = torch.empty((), dtype=STORAGE_DTYPES[dtype_name]).element_size()
    return hidden_size * element + (SCALE_BYTES if dtype_name == "fp8" else 0)


def encode_rows(rows: torch.Tensor, dtype_name: str) -> dict[str, torch.Tensor]:
    """Rows [n, hidden] in the storage dtype: {"": values} plus {".scale": per-row scale} for fp8."""
    if dtype_name != "fp8":
        return {"": rows.to(STORAGE_DTYPES[dtype_name]).contiguous()}
    amax = rows.abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero row keeps scale 1
    # a bfloat16 scale (2 bytes a row, not 4) quantised with the rounded value itself: its rounding (≤ 0.4 %) is far
    # below e4m3's own step (6 %), and a row's largest value may round 0.4 % past 448, where the clamp takes it
    scale = scale.to(torch.bfloat16)
    values = (rows.float() / scale.float()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"": values.contiguous(), ".scale": scale.contiguous()}


def decode_rows(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`encode_rows`' inverse, in the compute dtype `dtype`."""
    if scale is None:
        return values.to(dtype)
    return (values.float() * scale.float()[:, None]).to(dtype)


def refuse_uncacheable(objective: Any) -> None:
    """Objectives whose inputs a cache cannot hold (module doc)."""
    if getattr(objective, "data_source", None) is DataSource.on_policy:
        raise UserError("features.source=cache: objective.data_source=on_policy trains on responses the drafter "
                        "samples during training, which the live target must score; use features.source=online, or "
                        "objective.data_source=fixed")


def file_sha256(path: Path, progress: tqdm | None = None) -> str:
    """The sha256 of a file's bytes, read in blocks (`progress` advances by the bytes read)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()


def damaged_shards(folder: Path, records: dict[str, dict], desc: str) -> dict[str, str]:
    """shard file → why it is not the file its record (file → {"bytes", "sha256"}) describes: "missing", "<n> bytes,
    <m> recorded" or "checksum mismatch"; a record without sha256 (a cache written before they were recorded) is
    checked by size only. The progress bar shows only when hashing takes more than a few seconds."""
    damaged, sizes = {}, {}
    for name, record in records.items():
        path = folder / name
        sizes[name] = path.stat().st_size if path.is_file() else None
        if sizes[name] is None:
            damaged[name] = "missing"
        elif sizes[name] != record["bytes"]:
            damaged[name] = f"{sizes[name]} bytes, {record['bytes']} recorded"
    hashed = {name: record["sha256"] for name, record in records.items() if name not in damaged and "sha256" in record}
    with tqdm(total=sum(sizes[name] for name in hashed), desc=desc, unit="B", unit_scale=True, delay=3,
              mininterval=1.0) as progress:
        for name, sha256 in hashed.items():
            if file_sha256(folder / name, progress) != sha256:
                damaged[name] = "checksum mismatch"
    return damaged


def shard_problem(folder: Path, name: str, why: str) -> str:
    """"shard <path> is missing | is damaged (<why>)", for a `damaged_shards` entry."""
    return f"shard {folder / name} {'is missing' if why == 'missing' else f'is damaged ({why})'}"


def prep_command(out_dir: Path) -> str:
    return f"specdistill prep <the arguments that wrote data_dir> out_dir={out_dir} features.cache=true"


def read_manifest(folder: Path, hint: str) -> dict:
    """A cache's manifest: it exists, is this format and lists every shard's file and size (`check_shards` checks the
    files); else one line naming the folder, ending with `hint` (how to write the cache)."""
    path = folder / MANIFEST
    if not path.is_file():
        shards = list(folder.glob("*.safetensors")) if folder.is_dir() else []
        state = ("does not exist" if not folder.is_dir() else
                 f"holds {len(shards)} shards but no {MANIFEST}: writing it was interrupted" if shards else
                 f"holds no feature cache (no {MANIFEST})")
        raise UserError(f"features.path: {folder} {state}; {hint}")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} version {VERSION} manifest")
        if not all(isinstance(shard["file"], str) and isinstance(shard["bytes"], int) for shard in manifest["shards"]):
            raise ValueError("a shard without its file name or size")
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"features.path: {path} cannot be read ({type(error).__name__}: {error}); {hint}") from None
    return manifest


def check_shards(folder: Path, manifest: dict) -> None:
    """Every shard the manifest lists is there with its recorded size and sha256 (only its size when the manifest
    predates checksums, with a warning); else one line naming the first damaged shard and how to repair it. The
    cache is of this run's dataset (checked before), so rerunning the prep that wrote it rewrites no other data."""
    records = {shard["file"]: shard for shard in manifest["shards"]}
    repair = (f"rerun the prep that wrote it, the same command with the same out_dir "
              f"(`{prep_command(folder.parent)}`): it verifies every shard and rewrites the damaged ones")
    damaged = damaged_shards(folder, records, "features: verifying the cache")
    if damaged:
        others = len(damaged) - 1
        more = f" ({others} more {'shards are' if others > 1 else 'shard is'} damaged or missing)" if others else ""
        raise UserError(f"features.path: {shard_problem(folder, *next(iter(damaged.items())))}{more}; {repair}")
    if any("sha256" not in shard for shard in manifest["shards"]):
        log.warning("features: %s records no shard checksums (written by an older specdistill): its shards were "
                    "checked by size only; to record them, %s", folder / MANIFEST, repair)


def open_feature_cache(folder: Path, target: FrozenTarget, dataset: Any, feature_layers: Sequence[int],
                       objective: Any, data_dir: Path) -> "FeatureCache":
    """The cache in `folder`, checked against this run before any step: of this target (weights fingerprint, shape),
    of this dataset (hash), holding the drafter's layers, every shard intact (size, sha256), and an objective it can
    serve."""
    from specdistill.distill.drafters.feature import target_fingerprint

    refuse_uncacheable(objective)
    # until the cache is known to be of this dataset, advice to write one names data_dir's own prep out_dir (where
    # train looks by default): the folder `folder` is in may hold another dataset, which that prep would overwrite
    own, command = data_dir.parent / "features", prep_command(data_dir.parent)
    at_own = folder.resolve() == own.resolve()
    unset = "" if at_own else f", then train with features.path unset (that prep writes {own})"
    manifest = read_manifest(folder, f"write it with `{command}` (a re-run continues an interrupted write){unset}")
    cached, here = manifest["target"], {"fingerprint": target_fingerprint(target), "num_layers": target.num_layers,
                                        "hidden_size": target.config.hidden_size}
    if any(cached.get(key) != value for key, value in here.items()):
        raise UserError(f"features.path: the cache in {folder} was written from another target "
                        f"({cached.get('name_or_path')}, weights fingerprint {cached.get('fingerprint')}) than this "
                        f"run's (weights fingerprint {here['fingerprint']}); write data_dir's cache with this target "
                        f"(`{command}`){unset}, or train with features.source=online")
    fingerprint = dataset_fingerprint(dataset)
    for split, mine in fingerprint.items():
        theirs = manifest["dataset"].get(split)
        if theirs != mine:
            there = f"{theirs['records']} records, hash {theirs['sha256']}" if theirs else "no such split"
            point = "" if at_own else "point features.path= at the cache of data_dir's dataset, or "
            raise UserError(f"features.path: the cache in {folder} belongs to another dataset than data_dir={data_dir} "
                            f"(split {split}: {there} in the cache, {mine['records']} records, hash {mine['sha256']} "
                            f"here); {point}write data_dir's cache with `{command}`{unset}")
    missing = [layer for layer in feature_layers if layer not in manifest["layers"]]
    if missing:
        wanted = ",".join(str(layer) for layer in dict.fromkeys([*manifest["layers"], *feature_layers]))
        raise UserError(f"features.path: the cache in {folder} holds target layers {manifest['layers']}, but the "
                        f"drafter reads {list(feature_layers)} (missing {missing}); write a cache with them: "
                        f"`{prep_command(folder.parent)} features.layers=[{wanted}]`")
    check_shards(folder, manifest)
    log.info("features: read from the %s cache in %s (target layers %s), not from the target's forward",
             manifest["dtype"], folder, manifest["layers"])
    return FeatureCache(folder, manifest, target, feature_layers)


class FeatureCache:
    """A checked cache folder (`open_feature_cache`) that rebuilds what the target's forward would give a drafter's
    loss for a micro-batch of record indices."""

    def __init__(self, folder: Path, manifest: dict, target: FrozenTarget, feature_layers: Sequence[int]):
        self.folder, self.target, self.feature_layers = folder, target, tuple(feature_layers)
        self.rules = {entry["layer"]: entry["rule"] for entry in manifest["stored"]}
        self.dtype_name, self.shard_records = manifest["dtype"], manifest["shard_records"]
        self.shards: dict[str, list[dict]] = {}
        for shard in manifest["shards"]:
            self.shards.setdefault(shard["split"], []).append(shard)
        self._files: dict[str, Any] = {}  # shard file → open safe_open handle (memory-mapped)
        self._offsets: dict[tuple[str, str], list[int]] = {}
        self.has_argmax = bool(manifest.get("argmax"))  # caches written before prep stored it recompute it

    def _file(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self._files:
            self._files[name] = safe_open(str(self.folder / name), framework="pt", device="cpu")
        return self._files[name]

    def _rows(self, split: str, index: int, layer: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first `count` stored rows of record `index` of `split` at `layer` (and their fp8 scales)."""
        values = self._stored(split, index, f"layer.{layer}", count, self.rules[layer])
        scale = self._stored(split, index, f"layer.{layer}.scale", count, self.rules[layer]) \
            if self.dtype_name == "fp8" else None
        return values, scale

    def _stored(self, split: str, index: int, name: str, count: int, rule: str = LOGITS) -> torch.Tensor:
        """The first `count` rows of the stored tensor `name` for record `index` of `split`, laid out by `rule`."""
        shard = self.shards[split][index // self.shard_records]
        handle = self._file(shard["file"])
        if (shard["file"], rule) not in self._offsets:
            self._offsets[shard["file"], rule] = handle.get_tensor(f"offsets.{rule}").tolist()
        offsets, local = self._offsets[shard["file"], rule], index - shard["records"][0]
        start = offsets[local]
        if count > offsets[local + 1] - start:  # the dataset hash makes this impossible unless the shard is corrupt
            raise RuntimeError(f"{self.folder / shard['file']}: record {index} of {split} has "
                               f"{offsets[local + 1] - start} rows of {name}, the batch needs {count}")
        return handle.get_slice(name)[start : start + count]

    def _dense(self, split: str, indices: list[int], layer: int, input_ids: torch.Tensor,
               loss_mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq, hidden] of `layer` in the target's dtype: the stored rows at their positions, zeros
        elsewhere."""
        dtype, (batch, length) = self.target.model.dtype, input_ids.shape
        rule = self.rules[layer]
        if rule == EMBEDDING:  # prep checked that the target's layer-0 input is exactly its embedding
            return self.target.embed_tokens(input_ids).to(dtype)
        values, scales, flat = [], [], []
        for row, index in enumerate(indices):
            positions = stored_positions(rule, loss_mask[row])
            stored, scale = self._rows(split, index, layer, len(positions))
            values.append(stored)
            scales.append(scale)
            flat.append(positions + row * length)
        device = input_ids.device
        rows = decode_rows(torch.cat(values).to(device),
                           torch.cat(scales).to(device) if scales[0] is not None else None, dtype)
        dense = torch.zeros(batch * length, rows.shape[-1], dtype=dtype, device=device)
        dense[torch.cat(flat).to(device)] = rows
        return dense.view(batch, length, -1)

    @torch.no_grad()
    def target_output(self, split: str, indices: torch.Tensor, input_ids: torch.Tensor,
                      loss_mask: torch.Tensor) -> "CachedTargetOutput":
        """What `FrozenTarget(input_ids, feature_layers=…)` gives the drafter's loss for these records of `split`
        (right-padded, possibly truncated): the drafter's layers, and the logits where the losses read them (computed
        on first use, `CachedTargetOutput`)."""
        indices_list, mask = indices.tolist(), loss_mask.cpu()
        features = {layer: self._dense(split, indices_list, layer, input_ids, mask) for layer in self.feature_layers}
        final = features.get(FINAL_NORMED)
        if final is None:
            final = self._dense(split, indices_list, FINAL_NORMED, input_ids, mask)
        read = loss_mask[:, 1:].bool()  # p with loss_mask[p + 1] = 1: where every loss reads the target's logits
        argmax = self._argmax(split, indices_list, mask, read) if self.has_argmax else None
        return CachedTargetOutput(features, final[:, :-1][read], read, argmax, self.target.lm_head)

    def _argmax(self, split: str, indices: list[int], loss_mask: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """[batch, seq] the target's argmax token at the read positions (stored by prep), 0 elsewhere."""
        argmax = torch.zeros(read.shape[0], read.shape[1] + 1, dtype=torch.long, device=read.device)
        stored = [self._stored(split, index, ARGMAX, len(stored_positions(LOGITS, loss_mask[row])))
                  for row, index in enumerate(indices)]
        argmax[:, :-1][read] = torch.cat(stored).to(device=read.device, dtype=torch.long)
        return argmax


class CachedTargetOutput:
    """A `TargetOutput` rebuilt from the feature cache. `logits` (dense, over the whole vocabulary) is computed on
    first use; a loss that needs only the target's argmax and its logits over a reduced vocabulary (EAGLE-3) reads
    `argmax` (stored by prep) and `logits_over(ids)`, which runs the LM head's rows for those ids at the read
    positions only: with a 49k vocabulary and an 8k draft vocabulary, a sixth of the LM head's work and memory."""

    past_key_values = None

    def __init__(self, features: dict[int, torch.Tensor], final_rows: torch.Tensor, read: torch.Tensor,
                 argmax: torch.Tensor | None, lm_head: torch.nn.Linear):
        self.features, self.argmax = features, argmax
        self._final_rows, self._read, self._lm_head = final_rows, read, lm_head
        self._logits: torch.Tensor | None = None

    def _scatter(self, rows: torch.Tensor) -> torch.Tensor:
        dense = rows.new_zeros(self._read.shape[0], self._read.shape[1] + 1, rows.shape[-1])
        dense[:, :-1][self._read] = rows
        return dense

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self._scatter(self._lm_head(self._final_rows))
        return self._logits

    def logits_over(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq, len(token_ids)]: the logits of `token_ids` at the read positions, 0 elsewhere."""
        weight = self._lm_head.weight[token_ids.to(self._lm_head.weight.device)]
        return self._scatter(self._final_rows @ weight.T)
