"""The offline feature cache (`prep features.cache=true` → `train features.source=cache`): the reader rebuilds what the
target's forward gives the losses; training from an fp32 cache equals online training, bf16 and fp8 stay close at a
fraction of the bytes; an interrupted write continues without rewriting finished shards; a damaged shard (truncated,
or changed at the same size) is refused by train and rewritten by the same prep command; a cache that does not fit
the run is refused with one line whose advice never writes into another dataset's folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specdistill.data_prep.features import write_feature_cache
from specdistill.data_prep.prep import prep
from specdistill.distill.errors import UserError
from specdistill.distill.feature_cache import (
    CONTEXT,
    LOGITS,
    MANIFEST,
    open_feature_cache,
    record_row_counts,
    stored_positions,
)
from specdistill.distill.objectives import FeatureObjective
from specdistill.train import train as train_module  # registers the train schema for `compose`
from tests.conftest import EAGLE3_FAST, compose, run_cli

# multi-turn toy chat (user turns between assistant turns), small enough for seconds per run
DATA = ["target=toy_tiny", "data=toy_chat", "data.max_records=120", "data.validation_fraction=0.1"]
TRAIN = ["target=toy_tiny", "train.batch_size=4", "train.max_steps=8", "train.eval_every=4", "train.eval_batches=2",
         "train.tau_prompts=0", "train.log_every=1", "train.checkpoint_every=1000", "optim.lr=2e-3",
         "optim.warmup_ratio=0.1"]
KINDS = {"eagle3": ["drafter=eagle3", *EAGLE3_FAST], "eagle1": ["drafter=eagle1"], "fspad": ["drafter=fspad"],
         "hass": ["drafter=eagle1", "objective=hass", "objective.top_k_loss_weight=1"], "medusa": ["drafter=medusa"],
         "token_lm": ["drafter=token_lm", "drafter.num_layers=1"],
         "peagle": ["drafter=peagle", "objective=peagle", "drafter.parallel_depths=3"],
         "dflash": ["drafter=dflash", "objective=dflash", "drafter.block_size=4"]}
SHARD_RECORDS = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """`specdistill prep ... features.cache=true features.dtype=fp32`, in process: its out_dir."""
    out_dir = tmp_path_factory.mktemp("feature_prep")
    prep(compose("prep", [*DATA, "features.cache=true", "features.dtype=fp32",
                          f"features.shard_records={SHARD_RECORDS}", f"out_dir={out_dir}"]))
    return out_dir


def write_cache(prepared: Path, folder: Path, *overrides: str) -> dict:
    """Another cache of the prepared dataset into `folder` → its manifest."""
    from specdistill.distill.targets import load_target_tokenizer

    cfg = compose("prep", [*DATA, "features.cache=true", f"features.shard_records={SHARD_RECORDS}",
                           f"out_dir={prepared}", *overrides])
    write_feature_cache(cfg, prepared / "dataset", load_target_tokenizer(cfg.target, cfg.cache_dir), folder)
    return json.loads((folder / MANIFEST).read_text())


@pytest.fixture(scope="module")
def caches(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fp32 cache prep wrote, and bf16 / fp8 caches of the same dataset."""
    root = tmp_path_factory.mktemp("caches")
    for dtype in ("bf16", "fp8"):
        write_cache(prepared, root / dtype, f"features.dtype={dtype}")
    return {"fp32": prepared / "features", "bf16": root / "bf16", "fp8": root / "fp8"}


def train_run(out_dir: Path, data_dir: Path, kind: str, *overrides: str) -> tuple[list[dict], dict]:
    """A short in-process training run → (its history, its drafter's weights)."""
    drafter = train_module.train(compose("train", [*TRAIN, *KINDS[kind], f"data_dir={data_dir}", f"out_dir={out_dir}",
                                                   *overrides]))
    history = json.loads((drafter / "summary.json").read_text())["history"]
    return history, load_file(str(drafter / "model.safetensors"))


def losses(history: list[dict]) -> list[float]:
    return [record["loss"] for record in history if "loss" in record]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- what is stored, and what the reader rebuilds from it -------------------------------------------------------


def test_position_rules_match_the_bulk_row_counts(prepared: Path):
    import datasets

    split = datasets.load_from_disk(str(prepared / "dataset"))["train"]
    counts = record_row_counts(split)
    for index in range(0, len(split), 7):
        mask = torch.tensor(split[index]["loss_mask"])
        last = int(mask.nonzero()[-1])
        context, logits = stored_positions(CONTEXT, mask), stored_positions(LOGITS, mask)
        assert context.tolist() == list(range(last))  # every position before the last trained token, prompt included
        assert logits.tolist() == [p for p in range(len(mask) - 1) if mask[p + 1]]  # where a loss reads logits
        assert (len(context), len(logits)) == (counts[CONTEXT][index], counts[LOGITS][index])


def test_the_reader_rebuilds_the_targets_output_where_losses_read_it(prepared: Path, caches: dict, tiny):
    import datasets

    dataset = datasets.load_from_disk(str(prepared / "dataset"))
    layers = (0, 1, -1)
    cache = open_feature_cache(caches["fp32"], tiny.target, dataset, layers, FeatureObjective(), prepared / "dataset")
    indices = [3, 40, 17]
    rows = [dataset["train"][index] for index in indices]
    length = max(len(row["input_ids"]) for row in rows) - 5  # the longest row truncated, as train.max_length does
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention, loss_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for row, record in enumerate(rows):
        count = min(len(record["input_ids"]), length)
        input_ids[row, :count], attention[row, :count] = torch.tensor(record["input_ids"][:count]), 1
        loss_mask[row, :count] = torch.tensor(record["loss_mask"][:count])
    online = tiny.target(input_ids, attention, feature_layers=layers)
    cached = cache.target_output("train", torch.tensor(indices), input_ids, loss_mask)
    for row in range(len(rows)):
        context, read = stored_positions(CONTEXT, loss_mask[row]), stored_positions(LOGITS, loss_mask[row])
        for layer in layers:
            torch.testing.assert_close(cached.features[layer][row, context], online.features[layer][row, context],
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.logits[row, read], online.logits[row, read], rtol=1e-5, atol=1e-4)
        unread = torch.ones(length, dtype=torch.bool)
        unread[read] = False
        assert not cached.logits[row, unread].any()  # logits nowhere else
        assert not cached.features[1][row, len(context):].any()  # nothing after the last read position
        # what EAGLE-3's loss reads instead of the dense logits: prep's argmax, and the LM head over some ids only
        assert torch.equal(cached.argmax[row, read], online.logits[row, read].argmax(dim=-1))
        assert not cached.argmax[row, unread].any()
    some_ids = torch.tensor([2, 5, 300, 1000])
    over = cached.logits_over(some_ids)
    torch.testing.assert_close(over, cached.logits[..., some_ids], rtol=1e-5, atol=1e-5)


# --- training from a cache --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))  # every position rule: each kind's losses read what the cache holds
def test_training_from_an_fp32_cache_equals_online_training(kind: str, prepared: Path, caches: dict, tmp_path: Path):
    data_dir = prepared / "dataset"
    online, online_weights = train_run(tmp_path / "online", data_dir, kind)
    cached, cached_weights = train_run(tmp_path / "cached", data_dir, kind, "features.source=cache")
    assert [r["step"] for r in cached] == [r["step"] for r in online]
    gap = max(abs(a - b) / b for a, b in zip(losses(cached), losses(online)))
    drift = max((cached_weights[name].double() - weight.double()).abs().max().item()
                for name, weight in online_weights.items())
    print(f"{kind}: largest relative loss gap {gap:.2e}, largest weight difference {drift:.2e}")
    assert losses(cached) == pytest.approx(losses(online), rel=1e-5, abs=1e-6)
    for record, again in zip(online, cached):
        if "val_top1" in record:
            assert again["val_top1"] == pytest.approx(record["val_top1"], abs=1e-6)
    assert cached_weights.keys() == online_weights.keys()
    # 8 Adam steps on features equal to ~1e-7. Adam divides each update by √v, so where a gradient is near zero (an
    # embedding row of a rare token) a 1e-7 difference in it moves the weight visibly: token_lm's embeddings differ by
    # up to 5e-5, under 1 % of the 1.6e-2 that 8 steps at lr 2e-3 can move a weight. The losses above agree to 1e-5.
    for name, weight in online_weights.items():
        torch.testing.assert_close(cached_weights[name], weight, rtol=1e-4, atol=1e-4, msg=name)


def test_bf16_and_fp8_caches_train_close_to_online_at_a_fraction_of_the_bytes(prepared: Path, caches: dict,
                                                                              tmp_path: Path):
    data_dir = prepared / "dataset"
    online = losses(train_run(tmp_path / "online", data_dir, "eagle3")[0])
    gaps = {}
    for dtype in ("bf16", "fp8"):
        history, _ = train_run(tmp_path / dtype, data_dir, "eagle3", "features.source=cache",
                               f"features.path={caches[dtype]}")
        gaps[dtype] = max(abs(a - b) / b for a, b in zip(losses(history), online))
    manifests = {dtype: json.loads((folder / MANIFEST).read_text()) for dtype, folder in caches.items()}
    naive = manifests["fp8"]["naive_bf16_bytes_per_token"]
    ratios = {dtype: manifest["bytes_per_token"] / naive for dtype, manifest in manifests.items()}
    print(f"largest relative loss gap to online over 8 steps: {gaps}; bytes/token ÷ naive bf16 ({naive:.0f}): {ratios}")
    assert gaps["bf16"] < 1e-2  # bf16 keeps 8 mantissa bits (measured: 2e-3)
    assert gaps["fp8"] < 0.05  # fp8 (3 mantissa bits, per-row scale): measured and printed, bounded loosely
    assert ratios["fp8"] <= 0.5 and ratios["bf16"] < 1
    assert all(manifest["tokens"] == manifests["fp32"]["tokens"] for manifest in manifests.values())


# --- writing: resumable ------------------------------------------------------------------------------------------


def test_an_interrupted_write_continues_without_rewriting_finished_shards(prepared: Path, caches: dict,
                                                                         tmp_path: Path, monkeypatch):
    import safetensors.torch

    folder, real_save, written = tmp_path / "fp8", safetensors.torch.save_file, []

    def save_then_fail(tensors, path, metadata=None):
        if len(written) == 3:
            raise KeyboardInterrupt  # as if killed while the fourth shard is computed
        real_save(tensors, path, metadata=metadata)
        written.append(path)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_cache(prepared, folder, "features.dtype=fp8")
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    finished = sorted(folder.glob("*.safetensors"))
    assert len(finished) == 3 and not (folder / MANIFEST).exists() and not list(folder.glob(".*.tmp"))
    with pytest.raises(UserError, match="holds 3 shards but no manifest.json: writing it was interrupted"):
        open_feature_cache(folder, None, None, (), FeatureObjective(), prepared / "dataset")
    stamps = {path.name: path.stat().st_mtime_ns for path in finished}

    manifest = write_cache(prepared, folder, "features.dtype=fp8")  # the same command again
    assert {name: (folder / name).stat().st_mtime_ns for name in stamps} == stamps  # not rewritten
    # deleting the manifest and a shard: only that shard is written again
    (folder / MANIFEST).unlink()
    (folder / manifest["shards"][5]["file"]).unlink()
    before = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.safetensors")}
    assert write_cache(prepared, folder, "features.dtype=fp8")["shards"] == manifest["shards"]
    assert {name: (folder / name).stat().st_mtime_ns for name in before} == before

    clean = json.loads((caches["fp8"] / MANIFEST).read_text())
    assert {key: value for key, value in manifest.items() if key != "seconds"} == \
        {key: value for key, value in clean.items() if key != "seconds"}
    for shard in clean["shards"]:  # the same tensors as a write that was never interrupted
        resumed, whole = load_file(str(folder / shard["file"])), load_file(str(caches["fp8"] / shard["file"]))
        assert resumed.keys() == whole.keys()
        assert all(torch.equal(resumed[name].view(torch.uint8), whole[name].view(torch.uint8)) for name in whole)


# --- refusals: one line each -------------------------------------------------------------------------------------


def refused(tmp_path: Path, data_dir: Path, *overrides: str, kind: str = "eagle3") -> str:
    with pytest.raises(UserError) as error:
        train_run(tmp_path / "refused", data_dir, kind, "features.source=cache", *overrides)
    assert not (tmp_path / "refused" / "drafter").exists()
    return one_line(error)


def test_a_cache_that_does_not_fit_the_run_is_refused(prepared: Path, caches: dict, tmp_path: Path):
    data_dir = prepared / "dataset"
    broken = Path(shutil.copytree(caches["fp32"], tmp_path / "broken"))

    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["target"]["fingerprint"] = "0000000000000000"
    (broken / MANIFEST).write_text(json.dumps(manifest))
    line = refused(tmp_path, data_dir, f"features.path={broken}")
    assert "was written from another target (toy_tiny, weights fingerprint 0000000000000000)" in line
    # the advice writes data_dir's own cache, not into the folder of the cache named by features.path
    assert f"out_dir={prepared} features.cache=true" in line and "features.path unset" in line

    shutil.copy(caches["fp32"] / MANIFEST, broken / MANIFEST)
    (broken / manifest["shards"][2]["file"]).unlink()
    line = refused(tmp_path, data_dir, f"features.path={broken}")
    assert f"shard {broken / manifest['shards'][2]['file']} is missing; rerun the prep that wrote it" in line

    (broken / MANIFEST).unlink()
    line = refused(tmp_path, data_dir, f"features.path={broken}")
    assert f"{broken} holds {len(manifest['shards']) - 1} shards but no manifest.json" in line
    assert f"out_dir={prepared} features.cache=true" in line and "features.path unset" in line

    other = tmp_path / "other"  # another dataset, with the fp32 cache of the first
    prep(compose("prep", [*DATA[:2], "data.max_records=60", f"out_dir={other}"]))
    line = refused(tmp_path, other / "dataset", f"features.path={caches['fp32']}")
    assert "belongs to another dataset than data_dir=" in line and "split train: " in line
    # the advice writes the cache of data_dir in data_dir's own prep out_dir, never into the other dataset's
    assert f"out_dir={other} features.cache=true" in line and f"out_dir={prepared}" not in line, line
    assert "features.path" in line.split("; ", 1)[1]  # and says to stop pointing features.path at the other cache

    final_only = tmp_path / "final_only"
    write_cache(prepared, final_only, "features.layers=[-1]")
    line = refused(tmp_path, data_dir, f"features.path={final_only}")
    assert "holds target layers [-1], but the drafter reads [0, 1, -1] (missing [0, 1])" in line
    assert "features.layers=[-1,0,1]" in line

    line = refused(tmp_path, data_dir, "objective=tvd", "objective.data_source=on_policy", kind="token_lm")
    assert line.startswith("features.source=cache: objective.data_source=on_policy trains on responses the drafter")


# --- damaged shards: refused by train, repaired by the same prep command ------------------------------------------


def prep_again(out_dir: Path, capsys: pytest.CaptureFixture) -> str:
    """The prep command that wrote the `prepared` fixture, rerun with out_dir=`out_dir` → what it printed."""
    capsys.readouterr()
    prep(compose("prep", [*DATA, "features.cache=true", "features.dtype=fp32",
                          f"features.shard_records={SHARD_RECORDS}", f"out_dir={out_dir}"]))
    return capsys.readouterr().out


def copied_prep(prepared: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the prepared out_dir (dataset and fp32 cache), to damage → (its out_dir, its cache manifest)."""
    out_dir = Path(shutil.copytree(prepared, tmp_path / "prep"))
    return out_dir, json.loads((out_dir / "features" / MANIFEST).read_text())


def test_a_truncated_shard_is_refused_by_train_and_repaired_by_rerunning_prep(prepared: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture):
    out_dir, manifest = copied_prep(prepared, tmp_path)
    shard = out_dir / "features" / manifest["shards"][3]["file"]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # as an interrupted copy leaves it
    line = refused(tmp_path, out_dir / "dataset")
    assert f"shard {shard} is damaged ({len(whole) // 2} bytes, {len(whole)} recorded)" in line, line
    assert f"out_dir={out_dir} features.cache=true" in line and "the same out_dir" in line

    printed = prep_again(out_dir, capsys)
    assert f"features: shard {shard} is damaged ({len(whole) // 2} bytes, {len(whole)} recorded); rewriting it" \
        in printed, printed
    assert shard.read_bytes() == whole  # the same bytes as the first write
    assert json.loads((out_dir / "features" / MANIFEST).read_text())["shards"] == manifest["shards"]
    history, _ = train_run(tmp_path / "train", out_dir / "dataset", "eagle1", "features.source=cache")
    assert losses(history)
    assert "is complete already" in prep_again(out_dir, capsys)  # and a third run verifies it, rewriting nothing


def test_a_shard_corrupted_at_the_same_size_is_detected_and_repaired(prepared: Path, tmp_path: Path, tiny,
                                                                    capsys: pytest.CaptureFixture):
    import datasets

    out_dir, manifest = copied_prep(prepared, tmp_path)
    shard = out_dir / "features" / manifest["shards"][1]["file"]
    whole = bytearray(shard.read_bytes())
    data_start = 8 + int.from_bytes(whole[:8], "little")  # safetensors: header length, JSON header, tensor data
    middle = (data_start + len(whole)) // 2
    whole[middle : middle + 8] = bytes(byte ^ 0xFF for byte in whole[middle : middle + 8])
    shard.write_bytes(whole)
    line = refused(tmp_path, out_dir / "dataset")
    assert f"shard {shard} is damaged (checksum mismatch)" in line, line
    dataset = datasets.load_from_disk(str(out_dir / "dataset"))
    with pytest.raises(UserError, match="checksum mismatch"):
        open_feature_cache(out_dir / "features", tiny.target, dataset, (0, 1, -1), FeatureObjective(),
                           out_dir / "dataset")

    printed = prep_again(out_dir, capsys)
    assert f"features: shard {shard} is damaged (checksum mismatch); rewriting it" in printed, printed
    assert shard.read_bytes() == (prepared / "features" / shard.name).read_bytes()
    open_feature_cache(out_dir / "features", tiny.target, dataset, (0, 1, -1), FeatureObjective(),
                       out_dir / "dataset")


def test_a_cache_written_before_checksums_is_checked_by_size_and_prep_records_them(
        prepared: Path, tmp_path: Path, tiny, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture):
    import datasets

    out_dir, manifest = copied_prep(prepared, tmp_path)
    folder, data_dir = out_dir / "features", out_dir / "dataset"
    legacy = {**manifest, "shards": [{key: value for key, value in shard.items() if key != "sha256"}
                                     for shard in manifest["shards"]]}
    (folder / MANIFEST).write_text(json.dumps(legacy))
    dataset = datasets.load_from_disk(str(data_dir))
    with caplog.at_level("WARNING"):
        open_feature_cache(folder, tiny.target, dataset, (0, 1, -1), FeatureObjective(), data_dir)
    assert "records no shard checksums" in caplog.text and f"out_dir={out_dir}" in caplog.text

    stamps = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.safetensors")}
    printed = prep_again(out_dir, capsys)
    assert "written before shard checksums were recorded" in printed, printed
    assert {name: (folder / name).stat().st_mtime_ns for name in stamps} == stamps  # kept, not rewritten
    assert json.loads((folder / MANIFEST).read_text())["shards"] == manifest["shards"]  # checksums recorded


def test_the_cli_reports_a_missing_cache_in_one_line(prepared: Path, tmp_path: Path):
    result = run_cli("train", *TRAIN, "drafter=eagle1", f"data_dir={prepared / 'dataset'}",
                     f"features.path={tmp_path / 'nowhere'}", "features.source=cache", f"out_dir={tmp_path / 'out'}",
                     cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: features.path: {tmp_path / 'nowhere'} does not exist; "
                           "write it with `specdistill prep")


def test_prep_refuses_bad_feature_settings(tmp_path: Path, cache_dir: Path):
    with pytest.raises(UserError, match="features.shard_records=0: must be at least 1"):
        prep(compose("prep", [*DATA, "features.cache=true", "features.shard_records=0", f"out_dir={tmp_path}"]))
    with pytest.raises(UserError, match="features.layers: layer id 5 is out of range for a target with 2 layers"):
        prep(compose("prep", [*DATA, "features.cache=true", "features.layers=[5]", f"out_dir={tmp_path}"]))
