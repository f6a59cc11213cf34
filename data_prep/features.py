"""`specdistill prep features.cache=true`: run the frozen target once over every record of the dataset prep just
wrote and store what the drafters' losses read of it, for `specdistill train features.source=cache`.

    specdistill prep target=toy data=toy_chat features.cache=true                       # bf16, default layers
    specdistill prep ... features.cache=true features.dtype=fp8 features.layers=[1,3,5,-1]

distill/feature_cache.py states which positions of which layers are stored (and why) and the folder's layout. Each
shard is written to a temporary name, hashed and renamed; a re-run of the same prep command continues or repairs:
finished shards of the same plan (target, dataset, layers, dtype, shard size) whose size and sha256 still match
what was recorded are kept, the others written again, and the manifest is written last.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from specdistill.distill.drafters import feature_layers_every_kind_reads
from specdistill.distill.drafters.feature import target_fingerprint
from specdistill.distill.errors import UserError
from specdistill.distill.feature_cache import (
    ARGMAX,
    CHECKSUMS,
    CONTEXT,
    EMBEDDING,
    FORMAT,
    LOGITS,
    MANIFEST,
    PLAN,
    VERSION,
    damaged_shards,
    dataset_fingerprint,
    encode_rows,
    file_sha256,
    record_row_counts,
    row_bytes,
    shard_problem,
    stored_positions,
)
from specdistill.distill.outputs import json_text, replace_file, write_text_atomic
from specdistill.distill.target import FINAL_NORMED, FrozenTarget, check_feature_layers
from specdistill.distill.targets import load_target_model, tokenizer_fingerprint

log = logging.getLogger("specdistill.prep")


def check_features_config(features_cfg: Any) -> None:
    """The values the schema's types let through but the writer cannot use, checked before prep starts."""
    for key in ("shard_records", "batch_size"):
        if getattr(features_cfg, key) < 1:
            raise UserError(f"features.{key}={getattr(features_cfg, key)}: must be at least 1")
    if features_cfg.layers is not None and len(features_cfg.layers) == 0:
        raise UserError("features.layers=[]: name at least one target layer id, or leave it unset (null) for every "
                        "layer the feature drafters read")


def cache_layers(features_cfg: Any, num_layers: int) -> list[int]:
    """`features.layers`, else every layer a registered drafter kind reads of this target with its default options
    (each kind's `default_feature_layers`), so one cache serves every kind."""
    layers = features_cfg.layers
    if layers is None:
        layers = feature_layers_every_kind_reads(num_layers)
    layers = list(dict.fromkeys(int(layer) for layer in layers))
    check_feature_layers(layers, num_layers, "features.layers")
    return layers


def layer_zero_is_embedding(target: FrozenTarget, input_ids: list[int], device: torch.device) -> bool:
    """Whether the target's layer-0 input is exactly its token embedding (Llama-like models; not e.g. Gemma's scaled
    one), checked on the start of a record: then layer 0 is recomputed when training instead of stored."""
    ids = torch.tensor([input_ids[:16]], device=device)
    output = target(ids, torch.ones_like(ids), feature_layers=[0], compute_logits=False)
    with torch.inference_mode():
        return torch.equal(output.features[0], target.embed_tokens(ids))


def shard_plan(fingerprint: dict[str, dict], shard_records: int) -> list[dict]:
    """Each split's records in shards of `shard_records`: file name, split and record range."""
    shards = []
    for split, info in fingerprint.items():
        for number, start in enumerate(range(0, info["records"], shard_records)):
            shards.append({"file": f"{split}-{number:05d}.safetensors", "split": split,
                           "records": [start, min(start + shard_records, info["records"])]})
    return shards


ARGMAX_BYTES = 4  # int32 per logits position


def projected_sizes(dataset: Any, plan: dict) -> dict[str, float]:
    """Bytes per token and in all of this cache's tensors, and of the naive cache (bf16, every cached layer at every
    position), from the dataset's loss masks without running the target."""
    hidden, tokens = plan["target"]["hidden_size"], sum(info["tokens"] for info in plan["dataset"].values())
    rows = {rule: 0 for rule in (CONTEXT, LOGITS)}
    for split in plan["dataset"]:
        for rule, counts in record_row_counts(dataset[split]).items():
            rows[rule] += int(counts.sum())
    tensor_bytes = sum(rows[entry["rule"]] * row_bytes(plan["dtype"], hidden)
                       for entry in plan["stored"] if entry["rule"] != EMBEDDING)
    tensor_bytes += rows[LOGITS] * ARGMAX_BYTES
    naive = len(plan["layers"]) * row_bytes("bf16", hidden) * tokens
    return {"tokens": tokens, "tensor_bytes": tensor_bytes, "bytes_per_token": tensor_bytes / max(tokens, 1),
            "naive_bf16_bytes": naive, "naive_bf16_bytes_per_token": naive / max(tokens, 1)}


def announce(plan: dict, sizes: dict) -> None:
    layers = plan["layers"]
    recomputed = [entry["layer"] for entry in plan["stored"] if entry["rule"] == EMBEDDING]
    extra = [entry["layer"] for entry in plan["stored"] if entry["layer"] not in layers]
    notes = (["layer 0 is the token embedding: recomputed when training, not stored"] if recomputed else []) + \
        ([f"layer {FINAL_NORMED} at the logits positions only, for the LM head"] if extra else [])
    print(f"features: caching target layers {layers} in {plan['dtype']}"
          f"{' (' + '; '.join(notes) + ')' if notes else ''}\n"
          f"features: {plan['dtype']}: {sizes['bytes_per_token']:.1f} bytes/token, "
          f"{sizes['tensor_bytes'] / 1e6:.1f} MB projected for {sizes['tokens']:,} tokens; naive cache (bf16, "
          f"{len(layers)} layers at every position): {sizes['naive_bf16_bytes_per_token']:.1f} bytes/token, "
          f"{sizes['naive_bf16_bytes'] / 1e6:.1f} MB", flush=True)


def start_or_continue(folder: Path, plan: dict) -> None:
    """Keep what an interrupted run of the same plan wrote; otherwise remove the old cache (manifest first, so the
    folder never looks complete meanwhile) and record the new plan."""
    plan_path = folder / PLAN
    if plan_path.is_file() and plan_path.read_text() == json_text(plan, indent=1):
        return
    if plan_path.is_file():
        print(f"features: {folder} holds a cache of another target, dataset or settings: writing it again")
    (folder / MANIFEST).unlink(missing_ok=True)
    (folder / CHECKSUMS).unlink(missing_ok=True)
    for path in [*folder.glob("*.safetensors"), *folder.glob(".*.tmp")]:
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan_path, json_text(plan, indent=1))


def recorded_shards(folder: Path) -> tuple[dict[str, dict], bool]:
    """The finished shards' records (file → {"bytes", "sha256"}; no sha256 in a cache written before they were
    recorded) and whether they are a manifest's (a complete cache) rather than checksums.json's."""
    for name in (MANIFEST, CHECKSUMS):
        path = folder / name
        try:
            shards = json.loads(path.read_text())["shards"] if path.is_file() else None
            if shards is not None:
                return {shard["file"]: {key: shard[key] for key in ("bytes", "sha256") if key in shard}
                        for shard in shards}, name == MANIFEST
        except (ValueError, KeyError, TypeError):
            # damaged like a shard: the shards are checked against the other record, or written again
            print(f"features: {path} cannot be read; ignoring it")
    return {}, False


def verified_shards(folder: Path, plan: dict) -> dict[str, dict]:
    """The records of the plan's shards that are on disk as recorded (size, and sha256 where one is recorded); the
    others are reported, to be written again. A cache written before checksums has its sizes checked and its sha256s
    taken now. The manifest stays only when every shard passed against it."""
    recorded, complete = recorded_shards(folder)
    kept = {shard["file"]: recorded[shard["file"]] for shard in plan["shards"] if shard["file"] in recorded}
    for shard in plan["shards"]:
        if shard["file"] not in recorded and (folder / shard["file"]).is_file():  # renamed, then interrupted
            print(f"features: shard {folder / shard['file']} has no recorded size and sha256; rewriting it")
    damaged = damaged_shards(folder, kept, "features: verifying")
    for name, why in damaged.items():
        print(f"features: {shard_problem(folder, name, why)}; rewriting it")
        del kept[name]
    unhashed = [name for name, record in kept.items() if "sha256" not in record]
    if unhashed:
        print(f"features: {folder} was written before shard checksums were recorded: its {len(unhashed)} shards of "
              "the recorded size are kept and their sha256 recorded now (damage that kept a shard's size cannot be "
              "told from them; delete the folder to write every shard again)")
        for name in tqdm(unhashed, desc="features: hashing", unit="shard", delay=3):
            kept[name] = {**kept[name], "sha256": file_sha256(folder / name)}
    if not complete or damaged or unhashed or len(kept) < len(plan["shards"]):
        # the verified records first, then no manifest: the folder is not a cache until the rest is written
        write_checksums(folder, kept)
        (folder / MANIFEST).unlink(missing_ok=True)
    return kept


def write_checksums(folder: Path, records: dict[str, dict]) -> None:
    write_text_atomic(folder / CHECKSUMS, json_text({"shards": [{"file": name, **record}
                                                                for name, record in records.items()]}, indent=1))


def pad_right(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of right-padded rows, as `train` batches them."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def shard_tensors(target: FrozenTarget, records: dict[str, list], plan: dict, batch_size: int,
                  device: torch.device, progress: tqdm) -> dict[str, torch.Tensor]:
    """The stored rows of a shard's records (distill/feature_cache.py's layout), computed in batches of similar
    lengths (less padding)."""
    ids, masks = records["input_ids"], [torch.tensor(mask) for mask in records["loss_mask"]]
    stored = [(entry["layer"], entry["rule"]) for entry in plan["stored"] if entry["rule"] != EMBEDDING]
    rows: dict[int, list] = {layer: [None] * len(ids) for layer, _ in stored}
    argmax: list = [None] * len(ids)
    order = sorted(range(len(ids)), key=lambda index: -len(ids[index]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        input_ids, attention_mask = pad_right([ids[index] for index in chosen])
        output = target(input_ids.to(device), attention_mask.to(device), feature_layers=[layer for layer, _ in stored],
                        compute_logits=False)
        for row, index in enumerate(chosen):
            for layer, rule in stored:
                positions = stored_positions(rule, masks[index]).to(device)
                rows[layer][index] = output.features[layer][row, positions].cpu()
            # the target's argmax where the losses read its logits, from the unrounded final state: EAGLE-3's loss
            # then needs the LM head over its draft vocabulary only (feature_cache.py CachedTargetOutput)
            final = output.features[FINAL_NORMED][row, stored_positions(LOGITS, masks[index]).to(device)]
            argmax[index] = target.lm_head(final).argmax(dim=-1).to(torch.int32).cpu()
        progress.update(len(chosen))
    tensors = {ARGMAX: torch.cat(argmax)}
    for layer, rule in stored:
        for suffix, tensor in encode_rows(torch.cat(rows[layer]), plan["dtype"]).items():
            tensors[f"layer.{layer}{suffix}"] = tensor
    for rule in {rule for _, rule in stored} | {LOGITS}:
        counts = torch.tensor([0] + [len(stored_positions(rule, mask)) for mask in masks])
        tensors[f"offsets.{rule}"] = counts.cumsum(0)
    return tensors


def write_feature_cache(cfg: Any, dataset_dir: Path, tokenizer: Any, folder: Path | None = None) -> Path:
    """Write (or continue, or confirm) the cache of the dataset in `dataset_dir` into `folder` (default: beside it,
    `<prep out_dir>/features`); returns the folder."""
    import datasets
    from safetensors.torch import save_file

    features_cfg = cfg.features
    check_features_config(features_cfg)
    folder = Path(folder) if folder is not None else dataset_dir.parent / "features"
    dataset = datasets.load_from_disk(str(dataset_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = FrozenTarget(load_target_model(cfg.target, cfg.cache_dir, device=device))
    layers = cache_layers(features_cfg, target.num_layers)
    embedding = 0 in layers and layer_zero_is_embedding(target, dataset["train"][0]["input_ids"], device)
    stored = [{"layer": layer, "rule": EMBEDDING if layer == 0 and embedding else CONTEXT} for layer in layers]
    if FINAL_NORMED not in layers:  # the LM head's input, for the logits (never stored themselves)
        stored.append({"layer": FINAL_NORMED, "rule": LOGITS})
    fingerprint = dataset_fingerprint(dataset)
    plan = {
        "format": FORMAT, "version": VERSION,
        "target": {"name_or_path": str(cfg.target.name_or_path), "revision": cfg.target.revision,
                   "fingerprint": target_fingerprint(target), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                   "num_layers": target.num_layers, "hidden_size": target.config.hidden_size,
                   "dtype": str(target.model.dtype).removeprefix("torch.")},
        "dataset": fingerprint, "layers": layers, "stored": stored, "argmax": True, "dtype": features_cfg.dtype.name,
        "shard_records": features_cfg.shard_records, "shards": shard_plan(fingerprint, features_cfg.shard_records),
    }
    sizes = projected_sizes(dataset, plan)
    announce(plan, sizes)
    # prep holds its out_dir for the whole run (distill/outputs.py claim_out_dir): one prep at a time writes here
    start_or_continue(folder, plan)
    complete = (folder / MANIFEST).is_file()
    done = verified_shards(folder, plan)
    if (folder / MANIFEST).is_file():  # every shard verified against it
        print(f"features: {folder} is complete already (same target, dataset and settings; every shard's size "
              "and sha256 verified)")
        return folder
    total = sum(info["records"] for info in fingerprint.values())
    finished = sum(end - start for start, end in (shard["records"] for shard in plan["shards"]
                                                  if shard["file"] in done))
    if done and not complete:
        print(f"features: continuing in {folder}: {len(done)} of {len(plan['shards'])} shards already written")
    started = time.perf_counter()
    with tqdm(total=total, initial=finished, desc="features", unit="rec", mininterval=1.0) as progress:
        for shard in plan["shards"]:
            if shard["file"] in done:
                continue
            start, end = shard["records"]
            tensors = shard_tensors(target, dataset[shard["split"]][start:end], plan, features_cfg.batch_size,
                                    device, progress)
            # one metadata entry: safetensors writes several in no fixed order, and a shard's bytes (so its
            # sha256) should depend on its contents only, as a resumed or repaired write then shows
            description = json_text({"split": shard["split"], "records": [start, end]})
            with replace_file(folder / shard["file"]) as partial:
                save_file(tensors, str(partial), metadata={FORMAT: description})
                # hashed as written, before the rename: a later change to the file no longer matches
                record = {"bytes": partial.stat().st_size, "sha256": file_sha256(partial)}
            done[shard["file"]] = record
            write_checksums(folder, done)
    shards = [{**shard, **done[shard["file"]]} for shard in plan["shards"]]
    file_bytes = sum(shard["bytes"] for shard in shards)
    measured = file_bytes / max(sizes["tokens"], 1)
    write_text_atomic(folder / MANIFEST, json_text({
        **plan, "shards": shards, "tokens": sizes["tokens"], "file_bytes": file_bytes, "bytes_per_token": measured,
        "tensor_bytes": sizes["tensor_bytes"], "naive_bf16_bytes_per_token": sizes["naive_bf16_bytes_per_token"],
        "seconds": round(time.perf_counter() - started, 2)}, indent=1))
    print(f"features: wrote {folder}: {len(shards)} shards, {file_bytes / 1e6:.1f} MB, {measured:.1f} bytes/token "
          f"measured ({measured / sizes['naive_bf16_bytes_per_token']:.2f} × the naive bf16 cache's "
          f"{sizes['naive_bf16_bytes_per_token']:.1f})")
    return folder
