"""specdistill prep: raw conversations → tokenized, assistant-masked dataset for drafter training.

    specdistill prep target=toy data=toy_chat
    specdistill prep target=llama3_8b_instruct data=local data.path=chats.jsonl data.max_length=2048
    specdistill prep target=qwen3_8b data=ultrachat data.regenerate=true data.regen.temperature=0.7
    python -m specdistill.data_prep target=toy data=toy_chat out_dir=runs/toy_prep    # same thing

setup (tokenizer, records) → parse → [regenerate with the target] → tokenize and mask → split → save:

    <out_dir>/dataset/               datasets.DatasetDict (train, validation): input_ids, loss_mask
    <out_dir>/dataset/stats.json     records in / kept / dropped by reason, tokens, masked fraction, tokenizer
    <out_dir>/dataset/token_counts.safetensors   "counts": int64[vocab], masked-token frequencies (train split)
    <out_dir>/features/              with features.cache=true: the target's features for `train features.source=cache`
                                     (data_prep/features.py)

The dataset folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from specdistill.distill.config import CONFIG_DIR
from specdistill.data_prep.chat import TemplateMismatch, end_of_turn_ids, tokenize_conversation, tokenize_text
from specdistill.data_prep.config import register_configs
from specdistill.data_prep.readers import Conversation, MalformedRecord, PlainText, parse_record, read_records
from specdistill.distill.targets import load_target_model, load_target_tokenizer, tokenizer_fingerprint
from specdistill.distill.toy import toy_chat_conversations
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.outputs import claim_out_dir, replace_folder

log = logging.getLogger("specdistill.prep")
MAX_REPORTED_ERRORS = 20  # malformed records listed by index in stats.json and the log


def builtin_sources(seed: int) -> dict[str, Any]:
    return {"toy_chat": lambda: toy_chat_conversations(split="chat", seed=seed)}


class RecordErrors:
    """Counts malformed records by reason and keeps the first few by index (or raises with `on_error=raise`)."""

    def __init__(self, source: str, fatal: bool):
        self.source, self.fatal = source, fatal
        self.reasons: Counter[str] = Counter()
        self.examples: list[dict[str, Any]] = []

    def add(self, index: int, kind: str, detail: str) -> None:
        if self.fatal:
            raise UserError(
                f"{self.source}: record {index}: {detail}\n"
                "  Fix the record, or set data.on_error=skip to count and skip malformed records."
            )
        self.reasons[kind] += 1
        if len(self.examples) < MAX_REPORTED_ERRORS:
            self.examples.append({"index": index, "reason": detail})


def parse_all(records: Any, data_cfg: Any, errors: RecordErrors) -> dict[int, Conversation | PlainText]:
    parsed: dict[int, Conversation | PlainText] = {}
    for index, record in enumerate(tqdm(records, desc="parse", unit="rec", mininterval=1.0)):
        try:
            parsed[index] = parse_record(record, data_cfg.format.name)
        except MalformedRecord as error:
            errors.add(index, "malformed", str(error))
    return parsed


def check_regen(data_cfg: Any) -> None:
    """`data.regen.samples` > 1 only means something for sampled regeneration, follow-ups only with regeneration:
    say so instead of ignoring them."""
    follow_ups = data_cfg.regen.follow_ups
    if follow_ups < 0:
        raise UserError(f"data.regen.follow_ups={follow_ups}: give the number of follow-up turns to add (≥ 0)")
    if follow_ups and not data_cfg.regenerate:
        raise UserError(f"data.regen.follow_ups={follow_ups} asks follow-ups the target answers: set "
                        "data.regenerate=true too, or drop data.regen.follow_ups")
    if follow_ups and not [question for question in data_cfg.regen.follow_up_questions if question.strip()]:
        raise UserError(f"data.regen.follow_ups={follow_ups} with an empty data.regen.follow_up_questions: give the "
                        "questions to draw from, or drop data.regen.follow_ups")
    samples = data_cfg.regen.samples
    if samples < 1:
        raise UserError(f"data.regen.samples={samples}: give the number of replies to sample per conversation (≥ 1)")
    if samples > 1 and not data_cfg.regenerate:
        raise UserError(f"data.regen.samples={samples} samples the target's replies: set data.regenerate=true too, "
                        "or drop data.regen.samples")
    if samples > 1 and data_cfg.regen.temperature <= 0:
        raise UserError(f"data.regen.samples={samples} with data.regen.temperature={data_cfg.regen.temperature}: "
                        "greedy replies are all the same; set a temperature > 0 (e.g. 0.8) or data.regen.samples=1")


def regenerate(cfg: Any, parsed: dict[int, Conversation | PlainText], tokenizer: Any,
               out_dir: Path) -> tuple[list[dict[int, Conversation]], dict[str, int]]:
    """The conversations once per `data.regen.samples`, each with its own sampled replies by the target, and the
    counts for the statistics (summed over the samples)."""
    from specdistill.data_prep.regenerate import regenerate_conversations

    conversations = {index: item for index, item in parsed.items() if isinstance(item, Conversation)}
    if len(conversations) != len(parsed):
        raise UserError(
            f"data.regenerate=true needs conversations, but {len(parsed) - len(conversations)} records of "
            f"{cfg.data.path} are plain text. Use chat records or data.regenerate=false."
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_target_model(cfg.target, cfg.cache_dir, device=device)
    progress_path = out_dir / "regenerated.jsonl"
    log.info("regenerating assistant turns with the target; progress in %s (rerun with out_dir=%s to resume)",
             progress_path, out_dir)
    return regenerate_conversations(conversations, model, tokenizer, cfg.data.regen, progress_path, cfg.seed)


def tokenize_all(
    parsed: dict[int, Conversation | PlainText], tokenizer: Any, max_length: int, errors: RecordErrors, dropped: Counter
) -> tuple[dict[int, dict[str, list[int]]], int]:
    """record index → its example (input_ids, loss_mask), for the records that keep assistant tokens; and how many
    were truncated to `max_length`."""
    special_ids = end_of_turn_ids(tokenizer)
    examples, truncated = {}, 0
    for index, item in tqdm(parsed.items(), desc="tokenize", unit="rec", mininterval=1.0):
        try:
            if isinstance(item, PlainText):
                input_ids, loss_mask = tokenize_text(tokenizer, item.text)
            else:
                input_ids, loss_mask = tokenize_conversation(tokenizer, item.messages, special_ids)
        except TemplateMismatch as error:
            errors.add(index, "chat template not prefix-stable", str(error))
            continue
        if len(input_ids) > max_length:
            input_ids, loss_mask, truncated = input_ids[:max_length], loss_mask[:max_length], truncated + 1
        if not any(loss_mask):
            dropped["no assistant tokens within data.max_length"] += 1
            continue
        examples[index] = {"input_ids": input_ids, "loss_mask": loss_mask}
    return examples, truncated


def no_usable_records_error(
    source: str, records_in: int, dropped: Counter, errors: RecordErrors, data_format: str
) -> UserError:
    """Every record was dropped: say how many, why, the first reason in full, and what to change."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in dropped.most_common())
    first = f"; record {errors.examples[0]['index']}: {errors.examples[0]['reason']}" if errors.examples else ""
    if data_format != "auto" and errors.reasons["malformed"]:
        advice = (f"data.format={data_format} reads only that form: set data.format=auto to detect each record's "
                  "form (sharegpt, messages, alpaca or text), or fix the records.")
    else:
        advice = "Fix the records, or the setting a reason names (data.max_length; target.chat_template for templates)."
    return UserError(
        f"data.path: no usable records in {source}: {records_in} read, all dropped ({reasons}){first}\n  {advice}"
    )


def split_examples(examples: list, validation_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle's first `validation_fraction` (at least one when there are two or more) → validation."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_validation = round(len(examples) * validation_fraction) if len(examples) > 1 else 0
    if validation_fraction > 0 and len(examples) > 1:
        num_validation = max(1, num_validation)
    validation = [examples[i] for i in sorted(order[:num_validation])]
    train = [examples[i] for i in sorted(order[num_validation:])]
    return train, validation


def count_masked_tokens(examples: list[dict], vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for example in examples:
        ids = torch.tensor(example["input_ids"])[torch.tensor(example["loss_mask"], dtype=torch.bool)]
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def save_dataset(train: list[dict], validation: list[dict], counts: torch.Tensor, stats: dict, out_dir: Path) -> Path:
    """Write everything to a temporary folder and rename it into place, so a dataset folder is always complete and
    the previous one stays until the new one is (prep holds out_dir, so a second prep there meanwhile is refused)."""
    import datasets
    from safetensors.torch import save_file

    final = out_dir / "dataset"
    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")), "loss_mask": datasets.Sequence(datasets.Value("int8"))}
    )
    splits = {
        name: datasets.Dataset.from_list(rows, features=features) if rows else datasets.Dataset.from_dict(
            {"input_ids": [], "loss_mask": []}, features=features
        )
        for name, rows in (("train", train), ("validation", validation))
    }
    # an empty split needs one (empty) shard file, or datasets cannot load it back; others: ~500 MB a shard
    shards = {name: max(1, math.ceil(split.data.nbytes / 500e6)) for name, split in splits.items()}
    with replace_folder(final) as staging:
        datasets.DatasetDict(splits).save_to_disk(str(staging), num_shards=shards)
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        save_file({"counts": counts}, str(staging / "token_counts.safetensors"))
    return final


def prep(cfg: DictConfig) -> Path:
    with claim_out_dir(cfg.out_dir, "prep", cfg.overwrite) as out_dir:  # the out_dir rule (distill/outputs.py)
        return prep_into(cfg, out_dir)


def prep_into(cfg: DictConfig, out_dir: Path) -> Path:
    started = time.perf_counter()

    # setup
    check_regen(cfg.data)
    if cfg.features.cache:  # the drafter modules it imports load transformers: only when asked for
        from specdistill.data_prep.features import check_features_config, write_feature_cache

        check_features_config(cfg.features)
    records, source = read_records(cfg.data, builtin_sources(cfg.seed))  # before the tokenizer: fail fast
    if len(records) == 0:
        raise UserError(f"data.path: {source} holds no records")
    tokenizer = load_target_tokenizer(cfg.target, cfg.cache_dir)
    errors = RecordErrors(source, fatal=cfg.data.on_error.name == "raise")
    dropped: Counter[str] = Counter()

    # parse → regenerate (data.regen.samples times) → tokenize
    parsed = parse_all(records, cfg.data, errors)
    samples, regen_counts = regenerate(cfg, parsed, tokenizer, out_dir) if cfg.data.regenerate else ([parsed], {})
    by_record: dict[int, list[dict]] = {}  # a record's examples, one per sampled reply
    truncated = 0
    for sample in samples:
        examples_of_sample, truncated_in_sample = tokenize_all(sample, tokenizer, cfg.data.max_length, errors, dropped)
        truncated += truncated_in_sample
        for index, example in examples_of_sample.items():
            by_record.setdefault(index, []).append(example)
    dropped.update(errors.reasons)
    if not by_record:
        raise no_usable_records_error(source, len(records), dropped, errors, cfg.data.format.name)

    # split (by record: its sampled replies stay together) → save
    groups = [by_record[index] for index in sorted(by_record)]
    train_groups, validation_groups = split_examples(groups, cfg.data.validation_fraction, cfg.seed)
    train = [example for group in train_groups for example in group]
    validation = [example for group in validation_groups for example in group]
    examples = [example for group in groups for example in group]
    vocab_size = max(len(tokenizer), max(max(example["input_ids"]) for example in examples) + 1)
    counts = count_masked_tokens(train, vocab_size)
    num_tokens = sum(len(example["input_ids"]) for example in examples)
    num_masked = sum(sum(example["loss_mask"]) for example in examples)
    leading = sum(item.leading_turns_dropped for item in parsed.values() if isinstance(item, Conversation))
    stats = {
        "source": source,
        "format": cfg.data.format.name,
        "records_in": len(records),
        "records_kept": len(examples),
        "records_dropped": sum(dropped.values()),
        "dropped_by_reason": dict(dropped),
        "malformed_examples": errors.examples,
        "truncated_to_max_length": truncated,
        "leading_assistant_turns_dropped": leading,
        "regenerated": regen_counts,
        "replies_per_record": cfg.data.regen.samples if cfg.data.regenerate else 1,
        "train_records": len(train),
        "validation_records": len(validation),
        "tokens": num_tokens,
        "masked_tokens": num_masked,
        "masked_fraction": num_masked / num_tokens,
        "max_length": cfg.data.max_length,
        "tokenizer": {
            "name_or_path": cfg.target.name_or_path,
            "vocab_size": len(tokenizer),
            "fingerprint": tokenizer_fingerprint(tokenizer),
        },
        "seconds": round(time.perf_counter() - started, 2),
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }
    dataset_dir = save_dataset(train, validation, counts, stats, out_dir)
    log_summary(stats, errors, dataset_dir)
    if cfg.features.cache:
        write_feature_cache(cfg, dataset_dir, tokenizer)
    return dataset_dir


def log_summary(stats: dict, errors: RecordErrors, dataset_dir: Path) -> None:
    replies = stats["replies_per_record"]
    print(
        f"prep: {stats['records_in']} records in, {stats['records_kept']} kept "
        f"{f'({replies} sampled replies each) ' if replies > 1 else ''}"
        f"({stats['train_records']} train / {stats['validation_records']} validation), "
        f"{stats['records_dropped']} dropped {stats['dropped_by_reason'] or ''}\n"
        f"prep: {stats['tokens']} tokens, {stats['masked_fraction']:.1%} under the loss mask, "
        f"{stats['truncated_to_max_length']} truncated to {stats['max_length']}"
    )
    for example in errors.examples[:5]:
        print(f"prep: skipped record {example['index']}: {example['reason']}")
    if len(errors.examples) > 5:
        print(f"prep: ... all skipped records are listed in {dataset_dir / 'stats.json'}")
    print(f"prep: wrote {dataset_dir}")


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="prep", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    prep(cfg)


if __name__ == "__main__":
    main()
