"""specdistill eval: score drafters by speculative decoding of the target, beside plain decoding of the same prompts.

    specdistill eval target=toy drafter_path=outputs/train/<date>/<time>/drafter bench=toy
    specdistill eval ... eval.method=tree eval.tree_depth=6 eval.tree_top_k=10 eval.tree_total_tokens=60
    specdistill eval ... eval.temperature=1.0 eval.top_p=0.9            # lossless speculative sampling
    specdistill eval ... drafter_path='[run_a/drafter,run_b/drafter]'   # one side-by-side table
    specdistill eval target=llama3_8b_instruct drafter_path=... bench=mt_bench

setup (target, prompts, drafters) → evaluate (warm-up, then prompt by prompt: plain decoding, then each drafter,
interleaved so machine noise hits all alike) → save:

    <out_dir>/report.json   one object, a row per drafter (distill/reports.py, README.md "report.json")
    <out_dir>/report.md     the table, per-category numbers, α per position, plots (*.png)
    <out_dir>/generations.jsonl   per prompt and drafter: prompt, prompt_ids, output_ids, accept_lengths

Once its config and prompts check out, and before loading the target, a run moves the previous run's report files
into <out_dir>/previous/, so a run that fails never leaves an older report looking like its own; every file is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.outputs import claim_out_dir, replace_folder, write_text_atomic
from specdistill.distill.reports import report_document, report_rows
from specdistill.distill.drafters import load_drafting
from specdistill.distill.target import FrozenTarget
from specdistill.distill.targets import eos_token_ids, load_target_model, load_target_tokenizer
from specdistill.eval.benches import fit_context_window, load_bench, render_prompt
from specdistill.eval.config import EvalLoopConfig, LongPrompts, check_loop_ranges, register_configs
from specdistill.distill.decoding import Decoder, Generation, check_tree_width
from specdistill.eval.metrics import summarize, tokens_per_second
from specdistill.eval.report import REPORT_FILES, format_table, write_report

log = logging.getLogger(__name__)
register_configs()

DRAFTER_PATH_HINT = (
    "pass drafter_path=<train out_dir>/drafter (the folder `specdistill train` wrote, or a Hugging Face causal LM "
    "folder sharing the target's tokenizer), or drafter_path='[a/drafter,b/drafter]' to compare several"
)
# What `lossless_check` compared, by how the run decoded (report.json's `lossless_check_method`).
LOSSLESS_GREEDY = "greedy output equals plain decoding"
LOSSLESS_RE_DECODE = (
    "greedy re-decode with and without the drafter; the sampled outputs are not compared (lossless sampling is "
    "checked statistically by the test suite)"
)
LOSSLESS_SKIPPED = "not run (eval.verify_lossless=false; it defaults to true only for bench=toy)"


def drafter_paths(cfg: DictConfig) -> list[str]:
    if OmegaConf.is_missing(cfg, "drafter_path") or cfg.drafter_path is None:
        raise UserError(f"drafter_path is not set: {DRAFTER_PATH_HINT}")
    value = cfg.drafter_path
    paths = [str(path) for path in value] if OmegaConf.is_list(value) else [str(value)]
    if not paths or not all(path.strip() for path in paths):
        raise UserError(f"drafter_path is empty: {DRAFTER_PATH_HINT}")
    repeated = sorted({path for path in paths if paths.count(path) > 1})
    if repeated:  # drafters are keyed by path: a repeat would silently be evaluated once
        raise UserError(f"drafter_path lists {', '.join(repeated)} more than once; give each drafter folder once")
    return paths


def move_previous_report(out_dir: Path) -> None:
    """Move the report files of an earlier run in `out_dir` into `out_dir/previous/` (replacing what was there)."""
    found = [out_dir / name for name in REPORT_FILES if (out_dir / name).is_file()]
    if not found:
        return
    with replace_folder(out_dir / "previous") as staging:
        for path in found:
            path.rename(staging / path.name)
    log.info("moved the previous report (%s) to %s", ", ".join(p.name for p in found), out_dir / "previous")


class EvalRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)

    def setup(self) -> None:
        cfg = self.cfg
        loop = cfg.eval
        # Before loading anything (and before touching out_dir): a missing drafter_path, an out-of-range eval.* key
        # or a malformed prompt file fails fast.
        paths = drafter_paths(cfg)
        check_loop_ranges(loop)
        if loop.top_p < 1.0 and loop.temperature == 0:
            log.warning("eval.top_p=%s has no effect at eval.temperature=0 (greedy); set a temperature to sample",
                        loop.top_p)
        self.prompts = load_bench(cfg.bench, loop.num_prompts, seed=cfg.seed)
        move_previous_report(self.out_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_target_tokenizer(cfg.target, cfg.cache_dir)
        self.model = load_target_model(cfg.target, cfg.cache_dir, self.device)
        self.target = FrozenTarget(self.model)
        self.eos = eos_token_ids(self.tokenizer, self.model)
        self.prompt_ids = [render_prompt(self.tokenizer, prompt, cfg.bench.chat_template) for prompt in self.prompts]
        self.decoding: EvalLoopConfig = OmegaConf.to_object(loop)  # a DecodingConfig: the decoder takes it whole
        check_tree_width(self.decoding, self.model.config.vocab_size, "eval")
        self._fit_context_window()
        self.drafters = {
            path: load_drafting(path, self.target, self.device, cfg.target.trust_remote_code) for path in paths
        }
        verify = loop.verify_lossless
        self.verify_lossless = cfg.bench.name == "toy" if verify is None else verify
        log.info("eval: %d prompts from bench '%s', %d drafter(s), %s", len(self.prompts), cfg.bench.name,
                 len(self.drafters), self.decoding)

    def _fit_context_window(self) -> None:
        """Keep the prompts that decode inside the target's context window (eval.long_prompts: refuse or skip others)."""
        bench = self.cfg.bench
        kept = fit_context_window(self.prompts, self.prompt_ids, self.decoding,
                                  getattr(self.model.config, "max_position_embeddings", None),
                                  self.cfg.eval.long_prompts == LongPrompts.skip,
                                  f"bench.path={bench.path}" if bench.path else f"bench '{bench.name}'")
        self.skipped_prompts = len(self.prompts) - len(kept)
        if self.skipped_prompts:
            skipped = [prompt.id for index, prompt in enumerate(self.prompts) if index not in kept]
            log.warning("eval.long_prompts=skip: left out %d prompt(s) too long for the target's context window of %d "
                        "positions with eval.max_new_tokens=%d: %s", self.skipped_prompts,
                        self.model.config.max_position_embeddings, self.decoding.max_new_tokens, ", ".join(skipped))
        self.prompts = [self.prompts[index] for index in kept]
        self.prompt_ids = [self.prompt_ids[index] for index in kept]

    def _decoder(self, path: str | None, greedy: bool = False) -> Decoder:
        config = self.decoding
        if greedy:
            config = dataclasses.replace(config, temperature=0.0)
        return Decoder(self.target, self.drafters[path] if path else None, config, self.eos)

    def evaluate(self) -> dict:
        """Decode every prompt (module doc) → the report.json object (distill/reports.py)."""
        cfg = self.cfg
        plain = self._decoder(None)
        speculative = {path: self._decoder(path) for path in self.drafters}
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        for prompt in self.prompt_ids[: cfg.eval.warmup_prompts]:  # warm-up: allocator, kernels, caches
            plain.generate(prompt, generator)
            for decoder in speculative.values():
                decoder.generate(prompt, generator)
        baseline: list[Generation] = []
        results: dict[str, list[Generation]] = {path: [] for path in self.drafters}
        hf_runs: dict[str, list[tuple[list[int], float]]] = {}
        for prompt in tqdm(self.prompt_ids, desc="eval prompts", unit="prompt"):
            baseline.append(plain.generate(prompt, generator))
            for path, decoder in speculative.items():
                results[path].append(decoder.generate(prompt, generator))
            self._hf_baselines(prompt, hf_runs)
        checks = {path: self._lossless_check(path, baseline, results[path]) for path in self.drafters}
        rows = [self._row(path, baseline, results[path], checks[path]) for path in self.drafters]
        rows += [self._hf_row(name, runs, baseline) for name, runs in hf_runs.items()]
        self._write_generations(baseline, results)
        return report_document(self._run_fields(), rows)

    def _hf_baselines(self, prompt: list[int], runs: dict[str, list[tuple[list[int], float]]]) -> None:
        """transformers' own assisted generation and prompt lookup with each token-level drafter (greedy only)."""
        if not self.cfg.eval.hf_baselines or self.decoding.temperature > 0:
            return
        from specdistill.eval.baselines import hf_generate

        gamma, new = self.decoding.gamma, self.decoding.max_new_tokens
        for path, proposer in self.drafters.items():
            if proposer.assistant_model is not None:
                runs.setdefault(f"transformers assisted: {path}", []).append(
                    hf_generate(self.model, prompt, new, self.eos, assistant_model=proposer.assistant_model,
                                num_assistant_tokens=gamma))
        if any(proposer.assistant_model is not None for proposer in self.drafters.values()):
            runs.setdefault("transformers prompt lookup", []).append(
                hf_generate(self.model, prompt, new, self.eos, prompt_lookup_num_tokens=gamma))

    def _lossless_check(self, path: str, baseline: list[Generation], generations: list[Generation]) -> str:
        """Greedy: the speculative output must equal plain decoding's. Sampling: re-decode greedily to compare
        (`_lossless_check_method` says which was done)."""
        if not self.verify_lossless:
            return "skipped"
        if self.decoding.temperature > 0:
            plain, speculative = self._decoder(None, greedy=True), self._decoder(path, greedy=True)
            pairs = [(plain.generate(p).output_ids, speculative.generate(p).output_ids) for p in self.prompt_ids]
        else:
            pairs = [(b.output_ids, g.output_ids) for b, g in zip(baseline, generations)]
        mismatches = [index for index, (expected, got) in enumerate(pairs) if expected != got]
        if mismatches:
            log.error("lossless check FAILED for %s on prompts %s", path, mismatches)
        return "failed" if mismatches else "passed"

    def _lossless_check_method(self) -> str:
        if not self.verify_lossless:
            return LOSSLESS_SKIPPED
        return LOSSLESS_RE_DECODE if self.decoding.temperature > 0 else LOSSLESS_GREEDY

    def _run_fields(self) -> dict:
        """What every row of the report shares (distill/reports.py RUN_KEYS)."""
        return {"target": str(self.cfg.target.name_or_path), "bench": str(self.cfg.bench.name),
                "temperature": float(self.decoding.temperature), "hardware": hardware(self.device),
                "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)}

    def _row_fields(self, drafter: str) -> dict:
        return {"drafter": drafter, "method": self.decoding.method.value, "skipped_prompts": self.skipped_prompts}

    def _row(self, path: str, baseline: list[Generation], generations: list[Generation], check: str) -> dict:
        categories = [prompt.category for prompt in self.prompts]
        return {**self._row_fields(path), **summarize(generations, baseline, categories, self.decoding.draft_depth),
                "lossless_check": check, "lossless_check_method": self._lossless_check_method()}

    def _hf_row(self, name: str, runs: list[tuple[list[int], float]], baseline: list[Generation]) -> dict:
        speed = sum(len(ids) for ids, _ in runs) / max(sum(seconds for _, seconds in runs), 1e-12)
        baseline_speed = tokens_per_second(baseline)
        same = all(ids == b.output_ids for (ids, _), b in zip(runs, baseline))
        return {**self._row_fields(name), "tau": None, "alpha_per_position": [], "speedup": speed / baseline_speed,
                "predicted_speedup": None, "tokens_per_s": speed, "baseline_tokens_per_s": baseline_speed,
                "cost_ratio": None, "num_prompts": len(runs), "new_tokens": sum(len(ids) for ids, _ in runs),
                "lossless_check": "passed" if same else "failed", "lossless_check_method": LOSSLESS_GREEDY}

    def _write_generations(self, baseline: list[Generation], results: dict[str, list[Generation]]) -> None:
        lines = []
        for index, prompt in enumerate(self.prompts):
            rows = [("plain", baseline[index])] + [(name, runs[index]) for name, runs in results.items()]
            for drafter, generation in rows:
                lines.append(json.dumps({"id": prompt.id, "category": prompt.category, "drafter": drafter,
                                         "prompt": prompt.turns[0], "prompt_ids": self.prompt_ids[index],
                                         "output_ids": generation.output_ids,
                                         "accept_lengths": generation.accept_lengths}) + "\n")
        write_text_atomic(self.out_dir / "generations.jsonl", "".join(lines))

    def save(self, report: dict) -> dict[str, Path]:
        written = write_report(self.out_dir, report)  # nothing else: an evaluation never writes into its inputs
        print("\n" + format_table(report_rows(report)))
        print(f"\nreport: {self.out_dir / 'report.md'}  (report.json, generations.jsonl, plots beside it)")
        return written


def hardware(device: torch.device) -> str:
    """What the numbers were measured on, for the report and the model card: the GPU's name, or the CPU's cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}, {torch.get_num_threads()} torch threads)"


def evaluate(cfg: DictConfig) -> dict:
    """One eval run → its report.json object (distill/reports.py)."""
    recipe = EvalRecipe(cfg)
    with claim_out_dir(recipe.out_dir, "eval", cfg.overwrite):  # the out_dir rule (distill/outputs.py)
        recipe.setup()
        report = recipe.evaluate()
        recipe.save(report)
    return report


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
