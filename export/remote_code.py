"""The `hf` export: a drafter folder that `transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)`
(and `AutoConfig`) loads on a machine without specdistill, because the folder carries our modelling code.

The code is our own source, not a hand-kept twin: `bundle_remote_code` follows the drafter module's `specdistill.*`
imports (top-level and inside functions) to their closure and copies each module as one flat file, the only layout
transformers' dynamic modules know, with those imports made relative:

    from specdistill.distill.drafters.feature import A, B   →   from .feature import A, B
    from specdistill.distill import objectives               →   from . import objectives

transformers finds the files to copy with a regex that sees only `from .<module> import` lines
(`dynamic_module_utils.get_relative_imports`), so a `from . import <module>` import is also named, in that form, in a
never-run block at the end of the file. Every rewritten statement keeps its line count, so a traceback in the
bundle points at the same line as in our source. transformers also refuses a file whose imports (outside `try`
blocks, also inside functions) name a package that is not installed; hence the training-only imports of the
bundled modules (Hydra, omegaconf) sit in `try` blocks in our source.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from specdistill.distill.errors import UserError
from specdistill.distill.outputs import replace_folder

PROJECT_ROOT = "specdistill"  # the package whose modules are bundled (plus a plugin kind's own package)
FROM_HEADER = re.compile(r"from\s+([\w.]+)\s+import\b")  # `from a.b.c import`, group 1 the module
COPIED_FILES = ("model.safetensors", "model.safetensors.index.json", "resolved_config.yaml", "summary.json")


class RemoteCodeError(UserError):
    """A drafter module whose code cannot be bundled for `trust_remote_code` loading."""


@dataclass(frozen=True)
class BundledImport:
    """One import statement of a bundled module that names bundled modules."""

    node: ast.Import | ast.ImportFrom
    modules: tuple[str, ...]  # the bundled modules it loads (absolute names)
    from_module: str | None  # `from <from_module> import names` (a module, not a package); None: modules imported


def export_hf(drafter_dir: Path, out_dir: Path, model_class: type) -> None:
    """Write `out_dir`: the drafter folder's config.json (with `auto_map`), weights, resolved_config.yaml and
    summary.json, plus the bundled code. Staged beside `out_dir` and renamed into place at the end."""
    drafter_dir, out_dir = Path(drafter_dir), Path(out_dir)
    config = _drafter_config(drafter_dir, model_class)
    if not any((drafter_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"drafter_path: {drafter_dir} has no model.safetensors; export a complete drafter folder")
    with replace_folder(out_dir) as staging:
        for name in _weight_and_record_files(drafter_dir):
            shutil.copy2(drafter_dir / name, staging / name)
        config["auto_map"] = bundle_remote_code(model_class, staging)
        # the layout save_pretrained writes (sorted keys, 2 spaces)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def bundle_remote_code(model_class: type, out_dir: Path) -> dict[str, str]:
    """Copy the modules `model_class` needs into `out_dir` as flat files with relative imports (module doc) →
    the `auto_map` for config.json: {"AutoConfig": "<file>.<ConfigClass>", "AutoModel": "<file>.<ModelClass>"}."""
    entry, config_class = model_class.__module__, _config_class(model_class)
    roots = {PROJECT_ROOT, entry.partition(".")[0]}
    modules = _import_closure(entry, roots)
    flat = _flat_names(modules)
    if config_class.__module__ not in flat:
        raise RemoteCodeError(f"{config_class.__name__} is defined in {config_class.__module__}, which "
                              f"{entry} does not import; it cannot be bundled with {model_class.__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for module, (path, imports) in modules.items():
        source = path.read_text(encoding="utf-8")
        (out_dir / f"{flat[module]}.py").write_text(_rewrite(source, module, imports, flat), encoding="utf-8")
    _check_transformers_sees_bundle(out_dir / f"{flat[entry]}.py", {f"{name}.py" for name in flat.values()}, roots)
    return {"AutoConfig": f"{flat[config_class.__module__]}.{config_class.__name__}",
            "AutoModel": f"{flat[entry]}.{model_class.__name__}"}


def _config_class(model_class: type) -> type:
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        raise RemoteCodeError(f"{model_class.__name__} has no config_class; only drafters with their own "
                              "PretrainedConfig can be exported with their code (format=hf)")
    return config_class


def _drafter_config(drafter_dir: Path, model_class: type) -> dict:
    """The folder's config.json, checked to be one `model_class` saved."""
    from specdistill.distill.drafters.registry import read_drafter_config

    expected = _config_class(model_class).model_type
    config = read_drafter_config(drafter_dir)
    if config["model_type"] != expected:
        raise UserError(f"drafter_path: {drafter_dir} holds a {config['model_type']!r} drafter, not the "
                        f"{expected!r} of {model_class.__name__}")
    return config


def _weight_and_record_files(drafter_dir: Path) -> list[str]:
    """The files the export copies as they are: weights (sharded ones too) and the training records."""
    names = {name for name in COPIED_FILES if (drafter_dir / name).is_file()}
    names |= {path.name for path in drafter_dir.glob("model-*.safetensors")}
    return sorted(names)


def _module_file(module: str, imported_by: str | None) -> Path:
    """The source file of `module`, or a clear error naming it."""
    where = f" (imported by {imported_by})" if imported_by else ""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as error:
        raise RemoteCodeError(f"cannot bundle {module}{where}: {error}") from None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise RemoteCodeError(f"cannot bundle {module}{where}: no Python source file found for it")
    return Path(spec.origin)


def _is_package(module: str) -> bool:
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:  # its parent is missing: `_module_file` names it
        return False
    return spec is not None and spec.submodule_search_locations is not None


def _is_submodule(package: str, name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except ImportError:
        return False


def _import_closure(entry: str, roots: set[str]) -> dict[str, tuple[Path, list[BundledImport]]]:
    """Every module `entry` imports from `roots`, transitively (imports inside functions included, since a
    bundled file must hold whatever its functions import) → module → (source file, its bundled imports)."""
    found: dict[str, tuple[Path, list[BundledImport]]] = {}
    pending: list[tuple[str, str | None]] = [(entry, None)]
    while pending:
        module, imported_by = pending.pop(0)
        if module in found:
            continue
        path = _module_file(module, imported_by)
        if path.name == "__init__.py":
            raise RemoteCodeError(f"cannot bundle {module} (imported by {imported_by}): it is a package, whose "
                                  "__init__ a flat bundle cannot hold; import from the module that defines the names")
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imports = _bundled_imports(tree, module, roots)
        found[module] = (path, imports)
        pending += [(name, module) for bundled in imports for name in bundled.modules]
    return found


def _bundled_imports(tree: ast.Module, module: str, roots: set[str]) -> list[BundledImport]:
    """The import statements of `module` that load modules under `roots`."""
    package = module.rpartition(".")[0]
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            if base.partition(".")[0] in roots:
                imports.append(_from_import(node, base, module))
        elif isinstance(node, ast.Import):
            names = [alias for alias in node.names if alias.name.partition(".")[0] in roots]
            if not names:
                continue
            if len(names) != len(node.names) or any(alias.asname is None for alias in names):
                raise RemoteCodeError(f"cannot bundle {module} (line {node.lineno}): write `import "
                                      f"{names[0].name}` as `from ... import ...` or with `as <name>`, and on a line "
                                      "of its own, so it can be made relative")
            imports.append(BundledImport(node, tuple(alias.name for alias in names), None))
    return imports


def _from_import(node: ast.ImportFrom, base: str, module: str) -> BundledImport:
    """`from base import names`: names of a module, or submodules of a package (whose __init__ is not bundled)."""
    if not _is_package(base):
        return BundledImport(node, (base,), base)
    not_modules = [alias.name for alias in node.names if alias.name == "*" or not _is_submodule(base, alias.name)]
    if not_modules:
        raise RemoteCodeError(f"cannot bundle {module} (line {node.lineno}): it imports {', '.join(not_modules)} "
                              f"from the package {base}, whose __init__ a flat bundle cannot hold; import from the "
                              "module that defines them")
    return BundledImport(node, tuple(f"{base}.{alias.name}" for alias in node.names), None)


def _flat_names(modules: dict) -> dict[str, str]:
    """File name (without .py) of each bundled module: its last name where that is unique in the bundle, else its
    dotted path below the project root joined by `_` (transformers' dynamic modules are one flat folder)."""
    last = Counter(module.rpartition(".")[2] for module in modules)
    flat = {module: module.rpartition(".")[2] if last[module.rpartition(".")[2]] == 1
            else module.partition(".")[2].replace(".", "_") or module for module in modules}
    clashing = sorted(module for module in flat if list(flat.values()).count(flat[module]) > 1)
    if clashing:
        raise RemoteCodeError(f"cannot bundle {', '.join(clashing)}: their flat file names clash; rename one")
    return flat


def _alias(flat_name: str, bound: str) -> str:
    return flat_name if flat_name == bound else f"{flat_name} as {bound}"


def _relative_statement(bundled: BundledImport, flat: dict[str, str]) -> str:
    """The one-line relative form of a bundled import statement."""
    node = bundled.node
    if bundled.from_module is not None:
        names = ", ".join(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
                          for alias in node.names)
        return f"from .{flat[bundled.from_module]} import {names}"
    if isinstance(node, ast.ImportFrom):  # submodules of a package
        bound = [alias.asname or alias.name for alias in node.names]
    else:  # `import a.b.c as d`
        bound = [alias.asname for alias in node.names]
    return "from . import " + ", ".join(_alias(flat[module], name) for module, name in zip(bundled.modules, bound))


def _rewrite(source: str, module: str, imports: list[BundledImport], flat: dict[str, str]) -> str:
    """`source` with its bundled imports made relative, each statement's lines kept (blank lines pad a statement
    that spanned several), and the `from . import x` modules named where transformers' regex sees them."""
    lines = source.splitlines()
    for bundled in sorted(imports, key=lambda item: (item.node.lineno, item.node.col_offset), reverse=True):
        if not _rewrite_module_name(lines, bundled, flat):
            _rewrite_statement(lines, bundled, flat)
    module_imports = sorted({flat[name] for bundled in imports if bundled.from_module is None
                             for name in bundled.modules})
    tail = [
        "",
        "",
        f"# Bundled from {module} by specdistill (export/remote_code.py): its specdistill imports made relative.",
    ]
    if module_imports:
        tail += ["# transformers copies only the files named in `from .<module> import` lines; these name the ones",
                 "# imported above as `from . import <module>`. Never run.",
                 "if False:"] + [f"    from .{name} import __name__" for name in module_imports]
    return "\n".join(lines + tail) + "\n"


def _rewrite_module_name(lines: list[str], bundled: BundledImport, flat: dict[str, str]) -> bool:
    """`from a.b.c import (...)` → `from .c import (...)` in place, keeping the statement's layout and comments;
    False where the statement is not of that form or its header is split over lines."""
    node = bundled.node
    if bundled.from_module is None:
        return False
    start = len(lines[node.lineno - 1].encode()[: node.col_offset].decode())  # ast offsets count UTF-8 bytes
    header = FROM_HEADER.match(lines[node.lineno - 1], start)
    if header is None:
        return False
    line = lines[node.lineno - 1]
    lines[node.lineno - 1] = f"{line[: header.start(1)]}.{flat[bundled.from_module]}{line[header.end(1) :]}"
    return True


def _rewrite_statement(lines: list[str], bundled: BundledImport, flat: dict[str, str]) -> None:
    """Replace the whole statement by its one-line relative form; blank lines keep the lines after it in place."""
    node = bundled.node
    first, last = lines[node.lineno - 1].encode(), lines[node.end_lineno - 1].encode()  # offsets count UTF-8 bytes
    replaced = (first[: node.col_offset].decode() + _relative_statement(bundled, flat)
                + last[node.end_col_offset :].decode())
    lines[node.lineno - 1 : node.end_lineno] = [replaced] + [""] * (node.end_lineno - node.lineno)


def _check_transformers_sees_bundle(entry_file: Path, files: set[str], roots: set[str]) -> None:
    """transformers copies into its module cache the files its regex finds from the entry file, and nothing else:
    that must be exactly the bundle, and no bundled file may still import from `roots` absolutely."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    copied = {Path(path).name for path in get_relative_import_files(entry_file)} | {entry_file.name}
    if copied != files:
        raise RemoteCodeError(f"the bundle in {entry_file.parent} is not what transformers would load: it would copy "
                              f"{sorted(copied)}, the bundle holds {sorted(files)}")
    for name in sorted(files):
        absolute = sorted(set(get_imports(entry_file.parent / name)) & roots)
        if absolute:
            raise RemoteCodeError(f"{entry_file.parent / name} still imports {', '.join(absolute)} absolutely "
                                  "(an import form the bundler does not rewrite)")
