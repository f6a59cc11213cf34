"""Multi-turn benches (MT-Bench, `bench.num_turns=2`): each decoder decodes turn 2 after the conversation with its
own turn-1 answer; greedy speculative decoding equals plain decoding on both turns; τ, α, speedup and the
per-category rows count both turns; MT-Bench's packaged question file is read offline, and its absence (with the
Hub unreachable) or a multi-turn bench without a chat template is one clear error."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from specdistill.distill.errors import UserError
from specdistill.eval.benches import load_bench
from specdistill.eval.eval import EvalRecipe, evaluate
from tests.conftest import compose, random_drafter

# Two categories, both turns each; the toy target continues Python, so the turns are code or short requests.
ROWS = [
    {"question_id": 1, "category": "code", "turns": ["def add(a, b):", "Now a function that subtracts."]},
    {"question_id": 2, "category": "prose", "turns": ["import os\n", "Continue."]},
    {"question_id": 3, "category": "code", "turns": ["class Stack:", "Add a pop method."]},
]
NEW_TOKENS = 12
FAST = ["target=toy_tiny", "bench=local", "bench.num_turns=2", f"eval.max_new_tokens={NEW_TOKENS}",
        "eval.warmup_prompts=0", "eval.verify_lossless=true"]


def write_bench(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def two_turn_eval(tmp_path_factory: pytest.TempPathFactory, target, toy_tiny_path: Path):
    """One greedy eval of the 3 two-turn prompts with an untrained EAGLE-3 drafter (mostly rejected) and the target
    itself as a token-level drafter (always accepted; it also brings transformers' assisted generation and prompt
    lookup) → (out_dir, report.json, generations.jsonl's lines grouped by (prompt id, drafter) in turn order)."""
    folder = tmp_path_factory.mktemp("turns")
    eagle3, token_lm = folder / "eagle3", folder / "token_lm"
    random_drafter("eagle3", target, target_name_or_path="toy_tiny", draft_vocab_size=512).save_pretrained(
        eagle3, safe_serialization=True)
    shutil.copytree(toy_tiny_path, token_lm)
    bench = write_bench(folder / "bench.jsonl", ROWS)
    cfg = compose("eval", [*FAST, f"bench.path={bench}", f"drafter_path=[{eagle3},{token_lm}]",
                           f"out_dir={folder / 'out'}"])
    report = evaluate(cfg)
    conversations = defaultdict(list)
    for line in (folder / "out" / "generations.jsonl").read_text().splitlines():
        row = json.loads(line)
        conversations[row["id"], row["drafter"]].append(row)
    return folder / "out", report, dict(conversations)


def test_both_turns_are_decoded_losslessly_and_turn_two_follows_the_first_answer(two_turn_eval, toy_tokenizer):
    out_dir, report, conversations = two_turn_eval
    drafters = [row["drafter"] for row in report["rows"][:2]]
    for prompt_id in ("1", "2", "3"):
        plain = conversations[prompt_id, "plain"]
        assert [turn["turn"] for turn in plain] == [1, 2]
        for drafter in drafters:  # greedy decoding is lossless on both turns, each from the drafter's own answer
            theirs = conversations[prompt_id, drafter]
            assert [t["output_ids"] for t in theirs] == [t["output_ids"] for t in plain], (prompt_id, drafter)
            assert [t["prompt_ids"] for t in theirs] == [t["prompt_ids"] for t in plain]
        first, second = plain
        # turn 2 = turn 1's prompt, the turn-1 answer, then the second user turn and the assistant header. The answer
        # goes in as text (as a chat server gets it), so compare text: re-encoding may merge its tokens differently.
        assert second["prompt_ids"][: len(first["prompt_ids"])] == first["prompt_ids"]
        answer = toy_tokenizer.decode(first["output_ids"], skip_special_tokens=True)
        text = toy_tokenizer.decode(second["prompt_ids"])
        assert answer and text.startswith(toy_tokenizer.decode(first["prompt_ids"]) + answer + "<|end|>\n<|user|>")
        assert text.endswith(second["prompt"] + "<|end|>\n<|assistant|>")
        for turn in (first, second):
            assert sum(turn["accept_lengths"]) + 1 == len(turn["output_ids"])  # the prefill's token is not a step
    assert all(row["lossless_check"] == "passed" for row in report["rows"])  # the transformers baselines' too
    # 2 drafters + transformers generate + assisted (token-level) + prompt lookup
    assert [row["drafter"] for row in report["rows"][2:]] == ["transformers generate",
                                                             f"transformers assisted: {report['rows'][1]['drafter']}",
                                                             "transformers prompt lookup"]
    for row in report["rows"][:2]:  # each drafter's speedup over transformers' generate, from the tokens/s measured
        assert row["speedup_over_transformers"] == pytest.approx(row["tokens_per_s"] / report["rows"][2]["tokens_per_s"])
    assert "Speedup over transformers' plain greedy `generate`: " in (out_dir / "report.md").read_text()


def test_metrics_and_per_category_rows_count_both_turns(two_turn_eval):
    out_dir, report, conversations = two_turn_eval
    for row in report["rows"][:2]:
        turns = [turn for (_, drafter), lines in conversations.items() if drafter == row["drafter"] for turn in lines]
        steps = [length for turn in turns for length in turn["accept_lengths"]]
        assert len(turns) == 6 and row["num_prompts"] == 3 and row["skipped_prompts"] == 0
        assert row["new_tokens"] == sum(len(turn["output_ids"]) for turn in turns)
        assert row["tau"] == pytest.approx(sum(steps) / len(steps))
        categories = row["per_category"]
        assert set(categories) == {"code", "prose"}
        assert categories["code"]["num_prompts"] == 2 and categories["prose"]["num_prompts"] == 1
        for stats in categories.values():
            assert stats["tau"] >= 1 and stats["speedup"] > 0 and len(stats["alpha_per_position"]) == 5
    token_lm = report["rows"][1]  # the target drafting for itself: every draft accepted, on both turns
    assert token_lm["per_category"]["code"]["alpha_per_position"][0] == 1.0
    markdown = (out_dir / "report.md").read_text()
    assert "## Per category" in markdown and "| α per position (α1 / α2 / …) | speedup |" in markdown
    assert f"| {token_lm['drafter']} | prose | 1 | " in markdown


def test_packaged_mt_bench_is_read_offline_and_its_absence_names_setup_and_bench_path(tmp_path: Path, caplog):
    cfg = compose("eval", ["bench=mt_bench", f"cache_dir={tmp_path}", "drafter_path=/nope", f"out_dir={tmp_path}/o"])
    packaged = tmp_path / "real_bed" / "mt_bench" / "question.jsonl"
    assert cfg.bench.num_turns == 2 and cfg.bench.packaged_path == str(packaged)  # ${cache_dir} resolves in the group
    packaged.parent.mkdir(parents=True)
    write_bench(packaged, [{**row, "reference": ["x"]} for row in ROWS])
    with caplog.at_level("INFO", logger="specdistill.eval.benches"):
        prompts = load_bench(cfg.bench, num_prompts=None)
    assert [(p.id, p.category, len(p.turns)) for p in prompts] == [("1", "code", 2), ("2", "prose", 2),
                                                                    ("3", "code", 2)]
    assert f"from the packaged file {packaged}" in caplog.text

    packaged.unlink()  # and the Hub is unreachable: conftest sets HF_HUB_OFFLINE=1 before anything imports the Hub
    with pytest.raises(UserError) as error:
        load_bench(cfg.bench, num_prompts=None)
    message = str(error.value)
    for part in (f"bench.packaged_path={packaged}", "HuggingFaceH4/mt_bench_prompts", "`specdistill setup`",
                 "bench.path=<file.jsonl>"):
        assert part in message, message


def test_two_turns_without_a_chat_template_are_refused_before_the_target_loads(
    tmp_path: Path, toy_tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the target was loaded before the bench's turns were checked")

    monkeypatch.setattr("specdistill.eval.eval.load_target_model", no_loading)
    bench = write_bench(tmp_path / "bench.jsonl", ROWS)
    cfg = compose("eval", [*FAST, f"bench.path={bench}", "bench.chat_template=false", "drafter_path=/nope",
                           f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(UserError, match=r"bench\.num_turns=2 .*bench\.chat_template=false; set bench\.num_turns=1"):
        EvalRecipe(cfg).setup()


def test_a_second_turn_past_the_context_window_is_refused_or_skipped(tmp_path: Path, toy_tiny_path: Path,
                                                                      toy_tokenizer) -> None:
    """The first turns fit exactly; a second turn, longer by the first answer and its own text, does not."""
    from specdistill.eval.benches import BenchConfig, render_prompt

    rows = [ROWS[0], {"question_id": 9, "category": "code", "turns": ["def g(y):"]}]  # the second: one turn only
    bench = write_bench(tmp_path / "bench.jsonl", rows)
    first_turns = load_bench(BenchConfig(path=str(bench), num_turns=2), num_prompts=None)
    longest = max(len(render_prompt(toy_tokenizer, prompt, chat_template=True)) for prompt in first_turns)
    model = tmp_path / "model"  # the tiny toy target with a window just wide enough for the first turns
    shutil.copytree(toy_tiny_path, model)
    config = json.loads((model / "config.json").read_text())
    gamma = 2
    window = longest + NEW_TOKENS - 1 + gamma
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": window}))

    def run(long_prompts: str) -> dict:
        cfg = compose("eval", [*FAST, f"target.name_or_path={model}", f"drafter_path={model}", f"bench.path={bench}",
                               f"eval.gamma={gamma}", "eval.hf_baselines=false", f"eval.long_prompts={long_prompts}",
                               f"out_dir={tmp_path / long_prompts}"])
        return evaluate(cfg)

    with pytest.raises(UserError) as error:
        run("error")
    message = str(error.value)
    for part in ("prompt 0 (id '1'), turn 2", f"context window of {window}", "bench.num_turns=1",
                 "eval.long_prompts=skip"):
        assert part in message, message
    [row] = run("skip")["rows"]
    assert row["num_prompts"] == 1 and row["skipped_prompts"] == 1 and row["lossless_check"] == "passed"
    assert set(row["per_category"]) == {"code"}
