"""`specdistill eval` with bad input ends in one clear line (exit status 2, no traceback), before loading the target
where it can; a rerun into the same out_dir never leaves an older report looking like its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdistill.distill.decoding import DecodingConfig, check_tree_width
from specdistill.distill.errors import UserError
from specdistill.distill.outputs import mark_stage
from specdistill.distill.reports import report_rows
from specdistill.eval.eval import EvalRecipe, drafter_paths, move_previous_report
from tests.conftest import compose, run_cli

FAST = ["target=toy_tiny", "bench=toy", "eval.num_prompts=2", "eval.max_new_tokens=8", "eval.warmup_prompts=0"]


def eval_error(out_dir: Path, *overrides: str) -> str:
    """Run `specdistill eval` expecting a user error: → its one line on stderr."""
    result = run_cli("eval", *FAST, f"out_dir={out_dir}", *overrides, cwd=out_dir.parent)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr[-2000:]
    return lines[-1]


def test_eval_without_drafter_path_says_what_to_pass(tmp_path: Path) -> None:
    message = eval_error(tmp_path / "out")
    assert "drafter_path is not set" in message and "drafter_path=<train out_dir>/drafter" in message


@pytest.mark.slow
def test_out_of_range_values_fail_from_the_command_line(tmp_path: Path) -> None:
    # A few through the CLI as a user types them (each exits before any model loads); the full table is below.
    for override, expected in [
        ("eval.gamma=0", "eval.gamma=0 is out of range: it must be an integer ≥ 1"),  # was a reshape traceback
        ("eval.temperature=-1", "eval.temperature=-1.0 is out of range: it must be a number ≥ 0"),  # was greedy
    ]:
        assert expected in eval_error(tmp_path / "out", "drafter_path=/nope", override)


BAD_VALUES = [
    ("gamma", "0"), ("gamma", "-2"), ("tree_depth", "0"), ("tree_top_k", "0"), ("tree_total_tokens", "1"),
    ("temperature", "-1"), ("temperature", "nan"), ("top_p", "0"), ("top_p", "1.5"), ("max_new_tokens", "0"),
    ("num_prompts", "0"), ("warmup_prompts", "-1"), ("draft_threshold", "1.5"), ("draft_threshold", "-0.1"),
    ("hedge_prior_steps", "-1"), ("hedge_score_every", "0"),
]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_every_eval_range_is_checked_before_the_target_loads(
    key: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the target was loaded before the config was checked")

    monkeypatch.setattr("specdistill.eval.eval.load_target_tokenizer", no_loading)
    monkeypatch.setattr("specdistill.eval.eval.load_target_model", no_loading)
    cfg = compose("eval", [*FAST, "drafter_path=/nope", f"out_dir={tmp_path}", f"eval.{key}={value}"])
    with pytest.raises(UserError, match=rf"^eval\.{key}=\S+ is out of range: it must be "):
        EvalRecipe(cfg).setup()


def test_a_non_utf8_bench_file_names_the_file_and_line(tmp_path: Path) -> None:
    # Malformed JSON and rows without a prompt: tests/test_benches.py, and tests/test_eval.py through the CLI.
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    message = eval_error(tmp_path / "out", "drafter_path=/nope", "bench=local", f"bench.path={latin1}")
    assert f"{latin1}, line 2: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8" in message


def test_a_failed_rerun_moves_the_previous_report_aside(tmp_path: Path, toy_tiny_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mark_stage(out_dir, "eval")  # an earlier eval run's folder
    old = {"report.json": '{"tau": 2.5}\n', "report.md": "# old\n", "generations.jsonl": "{}\n",
           "alpha_per_position.png": "png"}
    for name, text in old.items():
        (out_dir / name).write_text(text)
    (out_dir / "notes.txt").write_text("mine")  # not a report file (the user's, in eval's folder): stays
    (out_dir / "previous").mkdir()
    (out_dir / "previous" / "report.json").write_text('{"tau": 1.0}\n')  # an older run's: replaced

    # The drafter fails to load after the target has loaded: the run had started.
    result = run_cli("eval", *FAST, "drafter_path=/nope", f"out_dir={out_dir}", cwd=tmp_path)
    assert result.returncode == 2 and "drafter_path: /nope" in result.stderr, result.stderr[-2000:]
    assert f"moved the previous report (report.json, report.md, generations.jsonl, alpha_per_position.png) to " \
           f"{out_dir / 'previous'}" in result.stdout + result.stderr
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")) == ["notes.txt", "previous"]
    assert {p.name: p.read_text() for p in (out_dir / "previous").iterdir()} == old


def test_nothing_to_move_leaves_previous_alone(tmp_path: Path) -> None:
    (tmp_path / "previous").mkdir()
    (tmp_path / "previous" / "report.json").write_text(json.dumps({"tau": 1.0}))
    move_previous_report(tmp_path)
    assert json.loads((tmp_path / "previous" / "report.json").read_text()) == {"tau": 1.0}
    move_previous_report(tmp_path / "absent")  # a new out_dir: nothing to do, nothing created
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("value, expected", [
    ("null", "drafter_path is not set: pass drafter_path="),
    ("[]", "drafter_path is empty: pass drafter_path="),
    ("[a/drafter,a/drafter]", "drafter_path lists a/drafter more than once"),
])
def test_unusable_drafter_path_values_are_named(value: str, expected: str, tmp_path: Path) -> None:
    cfg = compose("eval", [*FAST, f"drafter_path={value}", f"out_dir={tmp_path}"])
    with pytest.raises(UserError, match=rf"^{expected}"):
        drafter_paths(cfg)


def folder_snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under `folder`, dot-names included: its mode and, for a file, its bytes."""
    return {path.relative_to(folder).as_posix(): (path.stat().st_mode, path.read_bytes() if path.is_file() else None)
            for path in sorted(folder.rglob("*"))}


def test_eval_never_writes_into_the_drafter_folder(toy_tiny_path: Path, tmp_path: Path) -> None:
    """The drafter folder (and the folder holding it) is byte for byte as before; the model card still gets the
    eval's numbers, from the eval's own out_dir (`specdistill export reports=[<eval out_dir>]`)."""
    import shutil

    from specdistill.eval.eval import evaluate
    from specdistill.export.export import ExportConfig, ExportFormat, drafter_reports, export

    drafter = tmp_path / "run" / "drafter"  # a plain causal LM sharing the target's tokenizer: a token-level drafter
    shutil.copytree(toy_tiny_path, drafter)
    (drafter.parent / "notes.txt").write_text("the user's")
    before, beside = folder_snapshot(drafter), folder_snapshot(drafter.parent)
    cfg = compose("eval", [*FAST, f"drafter_path={drafter}", "eval.hf_baselines=false", f"out_dir={tmp_path / 'eval'}"])
    evaluate(cfg)
    assert folder_snapshot(drafter) == before and folder_snapshot(drafter.parent) == beside
    document = json.loads((tmp_path / "eval" / "report.json").read_text())
    [report] = document["rows"]
    assert report["drafter"] == str(drafter)

    export(ExportConfig(drafter_path=str(drafter), format=ExportFormat.hf, out_dir=str(tmp_path / "export"),
                        reports=[str(tmp_path / "eval")]))
    card = (tmp_path / "export" / "README.md").read_text()
    assert "## Evaluation" in card and "No evaluation recorded" not in card
    assert folder_snapshot(drafter) == before

    # a report comparing several drafters gives the card this drafter's rows only
    compared = tmp_path / "compared.json"
    compared.write_text(json.dumps({**document, "rows": [{**report, "drafter": str(tmp_path / "other")}, report]}))
    assert drafter_reports(drafter, [str(compared)]) == report_rows(document)


@pytest.mark.parametrize("group", ["eval", "train.tau"])
def test_a_tree_wider_than_the_vocabulary_is_refused_naming_the_key(group: str) -> None:
    # eval and τ during training decode with the same DecodingConfig, so both refuse it the same way
    tree = DecodingConfig(method="tree", tree_depth=2, tree_top_k=5000, tree_total_tokens=8)
    with pytest.raises(UserError, match=rf"^{group}\.tree_top_k=5000 is out of range: .* vocabulary size, 4096$"):
        check_tree_width(tree, 4096, group)
    check_tree_width(DecodingConfig(method="tree", tree_top_k=4096), 4096, group)  # the whole vocabulary is fine
    check_tree_width(DecodingConfig(method="chain", tree_top_k=5000), 4096, group)  # a chain does not branch


@pytest.mark.parametrize("overrides, message", [
    (["eval.method=chain", "eval.temperature=1"], r"^eval\.tree_candidates=sampled applies to trees only; set "
                                                  r"eval\.method=tree or eval\.tree_candidates=top_k$"),
    (["eval.method=tree", "eval.temperature=0"], r"^eval\.tree_candidates=sampled draws children .* set "
                                                 r"eval\.temperature > 0 or eval\.tree_candidates=top_k$"),
])
def test_sampled_tree_candidates_need_a_tree_and_sampling(tmp_path: Path, overrides, message) -> None:
    cfg = compose("eval", [*FAST, "drafter_path=/nope", f"out_dir={tmp_path}", "eval.tree_candidates=sampled",
                           *overrides])
    with pytest.raises(UserError, match=message):
        EvalRecipe(cfg).setup()


def test_traversal_on_a_tree_of_iid_draws_is_refused_naming_the_fix(tmp_path: Path) -> None:
    cfg = compose("eval", [*FAST, "drafter_path=/nope", f"out_dir={tmp_path}", "eval.method=tree", "eval.temperature=1",
                           "eval.tree_candidates=sampled", "eval.verification=traversal"])
    with pytest.raises(UserError, match=r"^eval\.verification=traversal reads the distribution each child .* set "
                                        r"eval\.tree_candidates=sampled_distinct \(draws without replacement\)$"):
        EvalRecipe(cfg).setup()


def test_a_dynamic_draft_length_with_a_tree_names_both_keys(tmp_path: Path) -> None:
    cfg = compose("eval", [*FAST, "drafter_path=/nope", f"out_dir={tmp_path}", "eval.method=tree",
                           "eval.draft_length=confidence"])
    with pytest.raises(UserError, match=r"^eval\.draft_length=confidence applies to chains only .* set "
                                        r"eval\.method=chain or eval\.draft_length=fixed$"):
        EvalRecipe(cfg).setup()


def test_transformers_baselines_on_a_spread_subset_of_the_prompts(toy_tiny_path: Path, tmp_path: Path) -> None:
    """eval.hf_baseline_prompts=2 of 4: transformers' rows decode prompts 0 and 2 only (the same tokens as ours there),
    and the report says the speedup over `generate` is over those."""
    import shutil

    from specdistill.eval.eval import evaluate, evenly_spaced

    assert evenly_spaced(80, 16) == set(range(0, 80, 5))  # MT-Bench's 10 a category → 2 from each
    assert evenly_spaced(3, 5) == evenly_spaced(3, None) == {0, 1, 2}
    drafter = tmp_path / "drafter"  # a token-level drafter: also transformers' assisted generation and prompt lookup
    shutil.copytree(toy_tiny_path, drafter)
    cfg = compose("eval", [*FAST, "eval.num_prompts=4", f"drafter_path={drafter}", "eval.hf_baseline_prompts=2",
                           f"out_dir={tmp_path / 'eval'}"])
    evaluate(cfg)
    document = json.loads((tmp_path / "eval" / "report.json").read_text())
    mine, *transformers_rows = document["rows"]
    assert mine["num_prompts"] == 4 and mine["speedup_over_transformers"] > 0
    assert [row["drafter"] for row in transformers_rows] == [
        "transformers generate", f"transformers assisted: {drafter}", "transformers prompt lookup"]
    lines = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    plain = {line["id"]: len(line["output_ids"]) for line in lines if line["drafter"] == "plain"}
    chosen = [line["id"] for line in lines if line["drafter"] == "plain"][0::2]  # prompts 0 and 2
    for row in transformers_rows:
        assert row["num_prompts"] == 2 and row["lossless_check"] == "passed"
        assert row["new_tokens"] == sum(plain[prompt] for prompt in chosen)
    assert "(on the 2 of the 4 prompts it decoded)" in (tmp_path / "eval" / "report.md").read_text()
