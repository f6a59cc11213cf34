"""`export format=hf`: a drafter folder with our own modelling code bundled loads with `AutoConfig` /
`AutoModel.from_pretrained(folder, trust_remote_code=True)` in a Python that cannot import specdistill (nor Hydra,
omegaconf, datasets, accelerate, wandb), and computes exactly what the drafter computes here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.dynamic_module_utils import get_imports

from specdistill.distill.drafters import drafter_kind
from specdistill.distill.drafters.eagle1 import Eagle1Drafter
from specdistill.distill.drafters.feature import FeatureDrafter
from specdistill.export.remote_code import RemoteCodeError, bundle_remote_code, export_hf
from tests.conftest import random_drafter

# kind → how its `forward` takes the target features: a dict by layer id, or the one tapped layer's tensor
KINDS = {"eagle3": "dict", "eagle1": "tensor"}

# Runs in the child: hides the packages a plain transformers install lacks from every import finder (so
# `importlib.util.find_spec` says "not installed", as transformers' availability checks expect), then loads each
# exported folder through the Auto classes and runs its bundled target and drafter on the parent's inputs.
CHILD = r"""
import importlib.util, json, sys
from pathlib import Path

HIDDEN = {"specdistill", "hydra", "omegaconf", "datasets", "accelerate", "wandb", "deepspeed"}


class Hiding:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, name):  # invalidate_caches, find_distributions, ...
        return getattr(self.inner, name)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.dynamic_module_utils import check_imports
from transformers.utils import HF_MODULES_CACHE

target_path, jobs = sys.argv[1], json.loads(sys.argv[2])
report = {"hidden_found": sorted(name for name in HIDDEN if importlib.util.find_spec(name) is not None),
          "modules_cache": str(HF_MODULES_CACHE), "kinds": {}}
causal_lm = AutoModelForCausalLM.from_pretrained(target_path)
for kind, job in jobs.items():
    folder = job["folder"]
    for file in sorted(Path(folder).glob("*.py")):  # what loading from the Hub checks for every file
        check_imports(file)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    drafter = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    package = type(drafter).__module__.rpartition(".")[0]
    target = importlib.import_module(package + ".target").FrozenTarget(causal_lm)
    drafter.check_target(target, "remote")
    drafter.attach_target(target)
    inputs = load_file(job["inputs"])
    layers = list(config.feature_layers)
    features = {layer: inputs[f"feature.{layer}"] for layer in layers}
    with torch.no_grad():
        own = target(inputs["input_ids"], inputs["attention_mask"], feature_layers=layers, for_training=True)
        taken = features if job["features_as"] == "dict" else features[layers[0]]
        output = drafter(inputs["input_ids"], taken, inputs["attention_mask"])
    save_file({"output": output.contiguous(), **{f"feature.{layer}": own.features[layer] for layer in layers},
               **{f"state.{name}": value.contiguous() for name, value in drafter.state_dict().items()}}, job["outputs"])
    report["kinds"][kind] = {
        "config_class": type(config).__name__, "model_class": type(drafter).__name__,
        "module_file": sys.modules[type(drafter).__module__].__file__,
    }
report["specdistill_loaded"] = sorted(name for name in sys.modules if name.partition(".")[0] in HIDDEN)
print(json.dumps(report))
"""


def build(kind: str, target) -> FeatureDrafter:
    """An untrained drafter with its norms randomised (so a dropped op shows) and, for EAGLE-3, a draft vocabulary
    that is not the first ids (so d2t/t2d matter)."""
    counts = torch.randint(0, 1000, (target.config.vocab_size,), generator=torch.Generator().manual_seed(2))
    return random_drafter(kind, target, token_counts=counts, **({"draft_vocab_size": 300} if kind == "eagle3" else {}))


def forward_here(drafter: FeatureDrafter, target, features_as: str) -> dict[str, torch.Tensor]:
    """Fixed inputs, the target's features of them, and this process's drafter output."""
    input_ids = torch.randint(3, target.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # a right-padded row
    layers = list(drafter.feature_layers)
    features = target(input_ids, attention_mask, feature_layers=layers, for_training=True).features
    with torch.no_grad():
        output = drafter(input_ids, features if features_as == "dict" else features[layers[0]], attention_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "output": output,
            **{f"feature.{layer}": features[layer] for layer in layers},
            **{f"state.{name}": value for name, value in drafter.state_dict().items()}}


@pytest.fixture(scope="module")
def remote(tiny, toy_tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Both kinds exported with export_hf and run once in the child → what each side computed (inputs, outputs,
    target features, drafter state)."""
    root = tmp_path_factory.mktemp("remote_code")
    jobs, here = {}, {}
    for kind, features_as in KINDS.items():
        drafter = build(kind, tiny.target)
        drafter.save_pretrained(root / f"{kind}_drafter")
        (root / f"{kind}_drafter" / "summary.json").write_text('{"steps": 0}', encoding="utf-8")
        export_hf(root / f"{kind}_drafter", root / f"{kind}_hf", drafter_kind(kind).model_class)
        here[kind] = forward_here(drafter, tiny.target, features_as)
        inputs = {name: value for name, value in here[kind].items() if name.partition(".")[0] in ("input_ids",
                  "attention_mask", "feature")}
        save_file(inputs, root / f"{kind}_in.safetensors")
        jobs[kind] = {"folder": str(root / f"{kind}_hf"), "inputs": str(root / f"{kind}_in.safetensors"),
                      "outputs": str(root / f"{kind}_out.safetensors"), "features_as": features_as}
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", CHILD, str(toy_tiny_path), json.dumps(jobs)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    there = {kind: load_file(job["outputs"]) for kind, job in jobs.items()}
    return SimpleNamespace(root=root, report=report, here=here, there=there)


def test_the_child_had_no_specdistill_and_used_its_own_module_cache(remote):
    assert remote.report["hidden_found"] == []
    assert remote.report["specdistill_loaded"] == []
    assert Path(remote.report["modules_cache"]) == remote.root / "hf_modules"
    for kind in KINDS:
        assert Path(remote.report["kinds"][kind]["module_file"]).is_relative_to(remote.root / "hf_modules")


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_exported_drafter_loads_through_the_auto_classes_and_computes_the_same(remote, kind):
    model_class, loaded = drafter_kind(kind).model_class, remote.report["kinds"][kind]
    assert (loaded["config_class"], loaded["model_class"]) == (model_class.config_class.__name__, model_class.__name__)
    here, there = remote.here[kind], remote.there[kind]
    assert sorted(there) == sorted(name for name in here if name.partition(".")[0] in ("output", "feature", "state"))
    for name in there:  # drafter output, the bundled FrozenTarget's taps, every weight and buffer (EAGLE-3's d2t, t2d)
        torch.testing.assert_close(there[name], here[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_export_folder_holds_the_drafter_files_and_an_auto_map(remote, kind):
    drafter_dir, export = remote.root / f"{kind}_drafter", remote.root / f"{kind}_hf"
    saved, exported = (json.loads((folder / "config.json").read_text()) for folder in (drafter_dir, export))
    model_class = drafter_kind(kind).model_class
    assert exported.pop("auto_map") == {"AutoConfig": f"{kind}.{model_class.config_class.__name__}",
                                        "AutoModel": f"{kind}.{model_class.__name__}"}
    assert exported == saved
    for name in ("model.safetensors", "summary.json"):
        assert (export / name).read_bytes() == (drafter_dir / name).read_bytes()
    code = {path.name for path in export.glob("*.py")}
    assert {f"{kind}.py", "feature.py", "target.py", "registry.py", "errors.py"} <= code
    assert all("specdistill" not in get_imports(path) for path in export.glob("*.py"))  # all made relative
    assert not list(remote.root.glob(f".{kind}_hf*"))  # no staging folder left beside it


BAD_KIND = """from specdistill.distill.drafters.eagle1 import Eagle1Drafter
from specdistill.distill.no_such_module import Thing
"""


def test_an_import_that_cannot_be_bundled_is_named_and_leaves_the_old_export_in_place(remote, tmp_path, monkeypatch):
    (tmp_path / "bad_kind.py").write_text(BAD_KIND, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = type("BadDrafter", (Eagle1Drafter,), {"__module__": "bad_kind"})  # its module file is never run
    with pytest.raises(RemoteCodeError, match=r"specdistill\.distill\.no_such_module \(imported by bad_kind\)"):
        bundle_remote_code(bad, tmp_path / "bundle")
    export = remote.root / "eagle1_hf"
    before = {path.name: path.read_bytes() for path in export.iterdir()}
    with pytest.raises(RemoteCodeError, match="no_such_module"):
        export_hf(remote.root / "eagle1_drafter", export, bad)
    assert {path.name: path.read_bytes() for path in export.iterdir()} == before
    assert not list(remote.root.glob(".eagle1_hf*"))


MINI_KIND = '''from transformers import PretrainedConfig, PreTrainedModel

from specdistill.distill import errors as error_types
import specdistill.distill.masks as mask_ops


class MiniConfig(PretrainedConfig):
    model_type = "mini_remote_code"


class MiniModel(PreTrainedModel):
    config_class = MiniConfig

    def forward(self):
        from specdistill.distill.target import (
            FINAL_NORMED,  # a comment inside the import
        )
        return error_types.UserError, mask_ops.PrefixMask, FINAL_NORMED
'''


def test_module_imports_are_made_relative_and_named_where_transformers_looks(tmp_path, monkeypatch):
    """`from package import module`, `import a.b as c` and imports inside functions: rewritten, and every bundled
    file is one transformers copies (its regex only sees `from .<module> import` lines)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    (tmp_path / "mini_remote_kind.py").write_text(MINI_KIND, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mini_remote_kind

    bundle = tmp_path / "remote_code_package" / "bundle"
    auto_map = bundle_remote_code(mini_remote_kind.MiniModel, bundle)
    assert auto_map == {"AutoConfig": "mini_remote_kind.MiniConfig", "AutoModel": "mini_remote_kind.MiniModel"}
    source = (bundle / "mini_remote_kind.py").read_text().splitlines()
    assert source[2:4] == ["from . import errors as error_types", "from . import masks as mask_ops"]
    assert source[14:17] == ["        from .target import (",  # line numbers and layout kept
                             "            FINAL_NORMED,  # a comment inside the import", "        )"]
    assert {Path(path).name for path in get_relative_import_files(bundle / "mini_remote_kind.py")} == {
        "errors.py", "kv_cache.py", "masks.py", "target.py"}
    # the bundled files run as a package of their own, as in transformers' module cache
    (tmp_path / "remote_code_package" / "__init__.py").touch()
    (bundle / "__init__.py").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    from remote_code_package.bundle import mini_remote_kind as bundled

    user_error, prefix_mask, final_normed = bundled.MiniModel.forward(None)
    assert (user_error.__module__, prefix_mask.__module__, final_normed) == (
        "remote_code_package.bundle.errors", "remote_code_package.bundle.masks", -1)
