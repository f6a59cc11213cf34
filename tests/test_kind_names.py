"""A drafter kind is one unit (DESIGN.md): no file outside its own module (distill/drafters/<kind>.py, its
conf/drafter/<kind>.yaml and conf/objective/*.yaml) names a kind. Every other file of the package (distill/ and the
stages, conf/*.yaml and conf/target/) reaches kinds through the registry. The scan looks at what code does: Python
identifiers and string literals, YAML keys and values. Docstrings, comments and the `--help` text are prose for
people, like README.md, and may name a kind as an example."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from specdistill.distill.drafters import registered_kinds

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("distill", "data_prep", "train", "eval", "export", "cli")
CONF_FILES = ("conf/*.yaml", "conf/target/*.yaml")
KIND_NAMES = sorted(kind.name for kind in registered_kinds())
# (file, where in it) → why that file may name a kind there
ALLOWED = {
    ("conf/train.yaml", "defaults.drafter"): "the train stage's default `drafter=` choice: a default of the drafter "
                                             "group must name one of its options",
}


def kind_name_pattern(names: list[str]) -> re.Pattern:
    """A kind name as a word of its own: not inside a longer name (eagle3 in Eagle3Drafter, token_lm in token_lms),
    but as a part of a snake_case identifier (eagle3_layers) or a string ("eagle3", "EAGLE3", "specdistill_eagle3")."""
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)


def python_words(source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every identifier and string literal of a Python source, docstrings and other string
    statements (prose) left out; comments never reach the syntax tree."""
    tree = ast.parse(source)
    prose = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
             and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            yield line, node.value
        elif isinstance(node, ast.Name):
            yield line, node.id
        elif isinstance(node, ast.Attribute):
            yield line, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield line, node.name
        elif isinstance(node, ast.arg):
            yield line, node.arg
        elif isinstance(node, ast.keyword) and node.arg:
            yield line, node.arg
        elif isinstance(node, ast.alias):
            yield line, f"{node.name} {node.asname or ''}"
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield line, node.module


def yaml_words(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(key path, text) of every key and scalar value of a YAML document, the `--help` text (hydra.help) left out."""
    if where == "hydra.help":
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield where, str(key)
            yield from yaml_words(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for item in value:
            yield from yaml_words(item, where)
    elif value is not None:
        yield where, str(value)


def named_kinds(words: Iterator[tuple[Any, str]], pattern: re.Pattern) -> list[tuple[Any, str]]:
    return [(where, text) for where, text in words if pattern.search(text)]


def kind_modules() -> set[Path]:
    """The source files of the registered kinds: the only Python files that may name them."""
    return {Path(sys.modules[kind.model_class.__module__].__file__).resolve() for kind in registered_kinds()}


def scanned_files() -> list[Path]:
    python = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    return [path for path in python if path.resolve() not in kind_modules()] + \
        [path for pattern in CONF_FILES for path in sorted(ROOT.glob(pattern))]


def hits_in(path: Path, pattern: re.Pattern) -> list[str]:
    relative = path.relative_to(ROOT).as_posix()
    source = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return [f"{relative}:{line}: {text!r}" for line, text in named_kinds(python_words(source), pattern)]
    words = yaml_words(yaml.safe_load(source))
    return [f"{relative} ({where}): {text!r}" for where, text in named_kinds(words, pattern)
            if (relative, where) not in ALLOWED]


def test_the_matcher_finds_a_planted_kind_name_and_skips_prose():
    pattern = kind_name_pattern(["eagle3", "token_lm"])
    planted = ('def serve(kind, eagle3_layers):\n'
               '    """eagle3 in a docstring is prose."""\n'
               '    # so is token_lm in a comment\n'
               '    algorithm = "EAGLE3" if kind.name == "eagle3" else "EAGLE"\n'
               '    return Eagle3Drafter, token_lms, f"specdistill_{kind}", "specdistill_token_lm"\n')
    found = named_kinds(python_words(planted), pattern)
    assert sorted(found) == [(1, "eagle3_layers"), (4, "EAGLE3"), (4, "eagle3"), (5, "specdistill_token_lm")]
    document = yaml.safe_load("defaults:\n  - drafter: eagle3\nlayers: {token_lm: 1}\n"
                              "hydra:\n  help:\n    header: drafter=eagle3 is an example in the help text\n")
    assert named_kinds(yaml_words(document), pattern) == [("defaults.drafter", "eagle3"), ("layers", "token_lm")]


def test_the_scan_covers_the_package_and_leaves_out_only_the_kinds_own_modules():
    scanned = {path.relative_to(ROOT).as_posix() for path in scanned_files()}
    assert {"distill/drafters/registry.py", "distill/drafters/feature.py", "distill/drafters/modules.py",
            "distill/drafters/engine_layouts.py", "data_prep/features.py", "export/export.py", "eval/eval.py",
            "conf/train.yaml", "conf/target/toy.yaml"} <= scanned
    assert not {f"distill/drafters/{name}.py" for name in KIND_NAMES} & scanned
    assert not any(name.startswith(("conf/drafter/", "conf/objective/")) for name in scanned)


def test_no_file_outside_a_kinds_unit_names_a_kind():
    pattern = kind_name_pattern(KIND_NAMES)
    hits = [hit for path in scanned_files() for hit in hits_in(path, pattern)]
    assert not hits, ("kind names outside distill/drafters/<kind>.py (reach the kind through "
                      "distill/drafters/registry.py instead):\n" + "\n".join(hits))


def test_every_allowed_exception_is_still_needed():
    pattern = kind_name_pattern(KIND_NAMES)
    for relative, where in ALLOWED:
        document = yaml.safe_load((ROOT / relative).read_text(encoding="utf-8"))
        assert any(key == where for key, _ in named_kinds(yaml_words(document), pattern)), (relative, where)
