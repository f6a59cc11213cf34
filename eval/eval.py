"""specdistill eval: score drafters by speculative decoding of the target, beside plain decoding of the same prompts.

    specdistill eval target=toy drafter_path=outputs/train/<date>/<time>/drafter bench=toy
    specdistill eval ... eval.method=tree eval.tree_depth=6 eval.tree_top_k=10 eval.tree_total_tokens=60
    specdistill eval ... eval.temperature=1.0 eval.top_p=0.9            # lossless speculative sampling
    specdistill eval ... drafter_path='[run_a/drafter,run_b/drafter]'   # one side-by-side table
    specdistill eval ... drafter_path='[run_a/drafter,run_b/drafter]' eval.selection=hedge   # + online selection
    specdistill eval ... eval.adaptation=online eval.adaptation_lr=1e-4   # + a drafter that trains as it decodes
    specdistill eval target=llama3_8b_instruct drafter_path=... bench=mt_bench

setup (target, prompts, drafters) → evaluate (warm-up, then prompt by prompt: plain decoding, then each drafter,
interleaved so machine noise hits all alike) → save:

    <out_dir>/report.json   one object, a row per drafter (distill/reports.py, README.md "report.json")
    <out_dir>/report.md     the table, per-category numbers, α per position, plots (*.png)
    <out_dir>/generations.jsonl   per prompt, drafter and turn: prompt, prompt_ids, output_ids, accept_lengths
    <out_dir>/adapted_drafter/    eval.adaptation=online: the adapted drafter, adaptation.json saying where it came from

A prompt of several turns (bench.num_turns, MT-Bench: 2) is decoded turn by turn by each decoder: a later turn is
rendered with the chat template after the earlier turns and that decoder's own answers (at greedy they are all the
plain decoder's, as decoding is lossless). Its metrics count every turn's decoding steps, tokens and time.

Once its config and prompts check out, and before loading the target, a run moves the previous run's report files
into <out_dir>/previous/, so a run that fails never leaves an older report looking like its own; every file is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from specdistill.distill.adaptation import OnlineAdapter
from specdistill.distill.config import CONFIG_DIR
from specdistill.distill.errors import UserError, exit_on_user_error
from specdistill.distill.outputs import claim_out_dir, replace_folder, write_text_atomic
from specdistill.distill.reports import report_document, report_rows
from specdistill.distill.drafters import load_drafting
from specdistill.distill.selection import HedgeDrafting
from specdistill.distill.target import FrozenTarget
from specdistill.distill.targets import eos_token_ids, load_target_model, load_target_tokenizer
from specdistill.eval.benches import (ContextWindow, check_turns_renderable, fit_context_window, load_bench,
                                      render_prompt)
from specdistill.eval.config import (Adaptation, EvalLoopConfig, LongPrompts, Selection, check_loop_ranges,
                                     register_configs)
from specdistill.distill.decoding import Decoder, Generation, check_tree_width
from specdistill.eval.metrics import combine_turns, summarize, tokens_per_second
from specdistill.eval.report import REPORT_FILES, format_table, write_report

log = logging.getLogger(__name__)
register_configs()

DRAFTER_PATH_HINT = (
    "pass drafter_path=<train out_dir>/drafter (the folder `specdistill train` wrote, or a Hugging Face causal LM "
    "folder sharing the target's tokenizer), or drafter_path='[a/drafter,b/drafter]' to compare several"
)
HF_GENERATE = "transformers generate"  # the report row of transformers' plain greedy `generate`
HEDGE = "hedge: online selection"  # the report row of eval.selection=hedge (distill/selection.py)
ADAPTED_DRAFTER = "adapted_drafter"  # eval.adaptation=online saves its drafter in <out_dir>/adapted_drafter
# What `lossless_check` compared, by how the run decoded (report.json's `lossless_check_method`).
LOSSLESS_GREEDY = "greedy output equals plain decoding"
LOSSLESS_RE_DECODE = (
    "greedy re-decode with and without the drafter; the sampled outputs are not compared (lossless sampling is "
    "checked statistically by the test suite)"
)
LOSSLESS_SKIPPED = "not run (eval.verify_lossless=false; it defaults to true only for bench=toy)"


@dataclass
class Turn:
    """One decoded turn of a prompt: the ids it was decoded from (the conversation so far) and what came of it."""

    prompt_ids: list[int]
    generation: Generation


Conversation = list[Turn]  # one prompt's turns as one decoder decoded them
Decode = Callable[[list[int]], Generation]  # prompt ids → their decoding by one decoder


def outputs(conversation: Conversation) -> list[list[int]]:
    """The new token ids of each turn: what the lossless check compares."""
    return [turn.generation.output_ids for turn in conversation]


def combined(conversations: list[Conversation]) -> list[Generation]:
    """One Generation per prompt, all its turns together (metrics.combine_turns)."""
    return [combine_turns([turn.generation for turn in conversation]) for conversation in conversations]


def evenly_spaced(count: int, chosen: int | None) -> set[int]:
    """`chosen` of the indices 0 … count − 1, spread evenly (the first of each equal stretch); None: all."""
    if chosen is None or chosen >= count:
        return set(range(count))
    return {number * count // chosen for number in range(chosen)}


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


@dataclass
class OnlineRow:
    """eval.adaptation=online: the row's name, its adapter and decoder, and whether the prompt being decoded is learned
    from (the stream) or only decoded with the weights learned so far (held out)."""

    name: str
    adapter: OnlineAdapter
    decoder: Decoder
    learning: bool = True
    learned_prompts: list[str] = field(default_factory=list)
    held_out_prompts: set[str] = field(default_factory=set)

    def decode(self, ids: list[int], generator: torch.Generator) -> Generation:
        generation = self.decoder.generate(ids, generator)
        if self.learning:  # between turns, never inside one: verification decided every token of this one
            self.adapter.update(ids, generation)
            self.decoder.use_proposer(self.adapter.drafting())
        generation.target_output = None  # vocabulary × positions floats, used: not kept with the conversation
        return generation


def move_previous_report(out_dir: Path) -> None:
    """Move the report files of an earlier run in `out_dir` (and its adapted drafter) into `out_dir/previous/`
    (replacing what was there)."""
    found = [out_dir / name for name in REPORT_FILES if (out_dir / name).is_file()]
    found += [out_dir / ADAPTED_DRAFTER] if (out_dir / ADAPTED_DRAFTER).is_dir() else []
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
        if loop.selection == Selection.hedge and len(paths) < 2:
            raise UserError(f"eval.selection=hedge chooses among several drafters, but drafter_path names "
                            f"{len(paths)}; pass drafter_path='[a/drafter,b/drafter]' or set eval.selection=none")
        if loop.adaptation == Adaptation.online and (len(paths) > 1 or loop.selection == Selection.hedge):
            raise UserError(f"eval.adaptation=online adapts one drafter, but drafter_path names {len(paths)}"
                            f"{' with eval.selection=hedge' if loop.selection == Selection.hedge else ''}; pass one "
                            "drafter folder (and eval.selection=none), or set eval.adaptation=none")
        if loop.top_p < 1.0 and loop.temperature == 0:
            log.warning("eval.top_p=%s has no effect at eval.temperature=0 (greedy); set a temperature to sample",
                        loop.top_p)
        self.prompts = load_bench(cfg.bench, loop.num_prompts, seed=cfg.seed)
        move_previous_report(self.out_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_target_tokenizer(cfg.target, cfg.cache_dir)
        check_turns_renderable(self.tokenizer, self.prompts, cfg.bench)
        self.model = load_target_model(cfg.target, cfg.cache_dir, self.device)
        self.target = FrozenTarget(self.model)
        self.eos = eos_token_ids(self.tokenizer, self.model)
        # the first turns; a later turn is rendered when decoded, after the answers before it (`_converse`)
        self.prompt_ids = [render_prompt(self.tokenizer, prompt, cfg.bench.chat_template) for prompt in self.prompts]
        self.decoding: EvalLoopConfig = OmegaConf.to_object(loop)  # a DecodingConfig: the decoder takes it whole
        check_tree_width(self.decoding, self.model.config.vocab_size, "eval")
        self.window = ContextWindow(getattr(self.model.config, "max_position_embeddings", None), self.decoding,
                                    loop.long_prompts == LongPrompts.skip,
                                    f"bench.path={cfg.bench.path}" if cfg.bench.path else f"bench '{cfg.bench.name}'")
        self._fit_context_window()
        self.drafters = {
            path: load_drafting(path, self.target, self.device, cfg.target.trust_remote_code) for path in paths
        }
        if loop.selection == Selection.hedge:  # one more row, drafting with the leader among the others
            self.drafters[HEDGE] = HedgeDrafting(dict(self.drafters), self.device, loop.hedge_prior_steps,
                                                 loop.hedge_score_every)
        self.online = None
        if loop.adaptation == Adaptation.online:
            adapter = OnlineAdapter(paths[0], self.target, self.device, loop.adaptation_lr, loop.adaptation_steps)
            decoder = Decoder(self.target, adapter.drafting(), self.decoding, self.eos, record_target=True)
            self.online = OnlineRow(f"online adaptation: {paths[0]}", adapter, decoder)
        verify = loop.verify_lossless
        self.verify_lossless = cfg.bench.name == "toy" if verify is None else verify
        log.info("eval: %d prompts from bench '%s', %d drafter(s), %s", len(self.prompts), cfg.bench.name,
                 len(self.drafters), self.decoding)

    def _fit_context_window(self) -> None:
        """Keep the prompts whose first turn decodes inside the target's context window (eval.long_prompts: refuse or
        skip others; later turns: `_converse`)."""
        kept = fit_context_window(self.prompts, self.prompt_ids, self.window)
        self.skipped_prompts = len(self.prompts) - len(kept)
        if self.skipped_prompts:
            skipped = [prompt.id for index, prompt in enumerate(self.prompts) if index not in kept]
            log.warning("eval.long_prompts=skip: left out %d prompt(s) too long for the target's context window of %d "
                        "positions with eval.max_new_tokens=%d: %s", self.skipped_prompts,
                        self.window.size, self.decoding.max_new_tokens, ", ".join(skipped))
        self._keep(kept)

    def _keep(self, indices: list[int]) -> None:
        self.prompts = [self.prompts[index] for index in indices]
        self.prompt_ids = [self.prompt_ids[index] for index in indices]

    def _drafting(self, name: str):
        """A row's drafter: a loaded one, or the online row's adapted one as it is now (its decoder's)."""
        if self.online is not None and name == self.online.name:
            return self.online.decoder.proposer
        return self.drafters[name]

    def _decoder(self, path: str | None, greedy: bool = False) -> Decoder:
        config = self.decoding
        if greedy:
            config = dataclasses.replace(config, temperature=0.0)
        return Decoder(self.target, self._drafting(path) if path else None, config, self.eos)

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
        hedge = self.drafters.get(HEDGE)
        if hedge is not None:
            hedge.reset_statistics()  # the report counts the measured prompts only
        decoders: dict[str, Decode] = {
            path: functools.partial(decoder.generate, generator=generator) for path, decoder in speculative.items()
        }
        online = self.online
        if online is not None:  # after the warm-up, which it skips: it learns from the measured stream only
            decoders[online.name] = functools.partial(online.decode, generator=generator)
            stream = len(self.prompts) - round(cfg.eval.adaptation_held_out * len(self.prompts))
        hf_decoders = self._hf_decoders()
        decoders.update(hf_decoders)
        hf_indices = evenly_spaced(len(self.prompts), cfg.eval.hf_baseline_prompts)
        baseline: list[Conversation] = []
        runs: dict[str, list[Conversation]] = {name: [] for name in decoders}
        kept = []
        for index in tqdm(range(len(self.prompts)), desc="eval prompts", unit="prompt"):
            if online is not None:
                online.learning = index < stream
                (online.learned_prompts.append if online.learning else online.held_out_prompts.add)(
                    self.prompts[index].id)
            plain_turns = self._converse(index, functools.partial(plain.generate, generator=generator))
            their_turns = {name: self._converse(index, decode) for name, decode in decoders.items()
                           if name not in hf_decoders or index in hf_indices}
            if not self._all_turns_fit(index, [plain_turns, *their_turns.values()]):
                continue
            kept.append(index)
            baseline.append(plain_turns)
            for name, conversation in their_turns.items():
                runs[name].append(conversation)
        if not kept:
            raise UserError(f"{self.window.bench}: every prompt has a later turn too long to decode within the "
                            f"target's context window of {self.window.size} (config.max_position_embeddings) after "
                            "the answers before it, so eval.long_prompts=skip leaves none; lower eval.max_new_tokens "
                            "or set bench.num_turns=1")
        self._keep(kept)
        selection = hedge.summary() if hedge is not None else None  # before the lossless check decodes again
        results = {path: runs[path] for path in self.drafters}
        if online is not None:
            results[online.name] = runs[online.name]
        checks = {name: self._lossless_check(name, baseline, results[name]) for name in results}
        rows = [self._row(name, baseline, results[name], checks[name]) for name in results]
        if selection is not None:
            rows[-1]["selection"] = selection_report(selection, rows[-1], rows[:-1])
        if online is not None:
            rows[-1]["adaptation"] = self._adaptation_report(results)
        hf_positions = [position for position, index in enumerate(kept) if index in hf_indices]  # in `baseline`
        if hf_decoders and hf_positions:
            hf_baseline = [baseline[position] for position in hf_positions]
            rows += [self._hf_row(name, runs[name], hf_baseline) for name in hf_decoders]
            # the speedup users quote: over transformers' plain greedy generate, on the prompts it decoded
            hf_speed = tokens_per_second(combined(runs[HF_GENERATE]))
            for row, name in zip(rows, results):
                mine = combined([results[name][position] for position in hf_positions])
                row["speedup_over_transformers"] = tokens_per_second(mine) / hf_speed
        elif hf_decoders:
            log.warning("eval.long_prompts=skip left out every prompt eval.hf_baseline_prompts chose for transformers' "
                        "baselines: the report has no transformers rows")
        self._write_generations(baseline, results)
        return report_document(self._run_fields(), rows)

    def _converse(self, index: int, decode: Decode) -> Conversation:
        """Decode prompt `index` turn by turn with one decoder, each later turn rendered after the earlier turns and
        this decoder's own answers to them. Shorter than the prompt's turns when a later turn would read past the
        context window and eval.long_prompts=skip (with eval.long_prompts=error that is a UserError)."""
        prompt, ids = self.prompts[index], self.prompt_ids[index]
        conversation = [Turn(ids, decode(ids))]
        for turn in range(2, len(prompt.turns) + 1):
            # The answers go in as text, without their end-of-turn token (the template writes its own), as a chat
            # server gets them; re-encoding the text may merge an answer's tokens otherwise than they were decoded.
            answers = [self.tokenizer.decode(done.generation.output_ids, skip_special_tokens=True)
                       for done in conversation]
            ids = render_prompt(self.tokenizer, prompt, self.cfg.bench.chat_template, answers)
            if not self.window.fits(prompt, index, ids, turn):
                break
            conversation.append(Turn(ids, decode(ids)))
        return conversation

    def _all_turns_fit(self, index: int, conversations: list[Conversation]) -> bool:
        """Whether every decoder decoded all the prompt's turns; if not, the prompt is left out for all of them alike
        and counted in skipped_prompts (eval.long_prompts=skip)."""
        prompt = self.prompts[index]
        if all(len(conversation) == len(prompt.turns) for conversation in conversations):
            return True
        self.skipped_prompts += 1
        log.warning("eval.long_prompts=skip: left out prompt %s: a later turn, after the answers before it, is too "
                    "long for the target's context window of %d positions with eval.max_new_tokens=%d", prompt.id,
                    self.window.size, self.decoding.max_new_tokens)
        return False

    def _hf_decoders(self) -> dict[str, Decode]:
        """transformers' own decoding (greedy only): plain `generate`, the baseline users know; with token-level
        drafters also its assisted generation with each of them, and its prompt lookup."""
        if not self.cfg.eval.hf_baselines or self.decoding.temperature > 0:
            return {}
        assistants = {path: proposer.assistant_model for path, proposer in self.drafters.items()
                      if proposer.assistant_model is not None}
        from specdistill.eval.baselines import hf_generate

        gamma, new = self.decoding.gamma, self.decoding.max_new_tokens

        def decoder(**options) -> Decode:
            def decode(ids: list[int]) -> Generation:
                output_ids, seconds = hf_generate(self.model, ids, new, self.eos, **options)
                return Generation(output_ids, [], [], [], seconds=seconds)  # its steps are not measured
            return decode

        decoders = {HF_GENERATE: decoder()}
        decoders.update({f"transformers assisted: {path}": decoder(assistant_model=model, num_assistant_tokens=gamma)
                         for path, model in assistants.items()})
        if assistants:
            decoders["transformers prompt lookup"] = decoder(prompt_lookup_num_tokens=gamma)
        return decoders

    def _lossless_check(self, path: str, baseline: list[Conversation], conversations: list[Conversation]) -> str:
        """Greedy: the speculative output of every turn must equal plain decoding's. Sampling: re-decode greedily to
        compare (`_lossless_check_method` says which was done)."""
        if not self.verify_lossless:
            return "skipped"
        if self.decoding.temperature > 0:
            plain, speculative = self._decoder(None, greedy=True), self._decoder(path, greedy=True)
            pairs = [(self._converse(index, plain.generate), self._converse(index, speculative.generate))
                     for index in range(len(self.prompts))]
        else:
            pairs = list(zip(baseline, conversations))
        # Turn by turn: equal earlier turns render equal later prompts, so a conversation one side ended early (a
        # later turn past the context window) differs from the other's in an earlier turn, which is caught here.
        mismatches = [f"{prompt.id} turn {number}" for prompt, (expected, got) in zip(self.prompts, pairs)
                      for number, (want, have) in enumerate(zip(outputs(expected), outputs(got)), start=1)
                      if want != have]
        if mismatches:
            log.error("lossless check FAILED for %s on %s", path, ", ".join(mismatches))
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

    def _row(self, path: str, baseline: list[Conversation], conversations: list[Conversation], check: str) -> dict:
        categories = [prompt.category for prompt in self.prompts]
        numbers = summarize(combined(conversations), combined(baseline), categories, self.decoding.draft_depth,
                            parallel=self._drafting(path).parallel)
        return {**self._row_fields(path), **numbers, "lossless_check": check,
                "lossless_check_method": self._lossless_check_method()}

    def _adaptation_report(self, results: dict[str, list[Conversation]]) -> dict:
        """The online row's `adaptation` (report.json): τ on the stream it learned from and on the held-out prompts,
        beside the frozen drafter's τ on the same prompts (its own row)."""
        online = self.online
        frozen, adapted = results[next(iter(self.drafters))], results[online.name]

        def tau(conversations: list[Conversation], held_out: bool) -> float | None:
            chosen = [c for prompt, c in zip(self.prompts, conversations)
                      if (prompt.id in online.held_out_prompts) == held_out]
            steps = [length for g in combined(chosen) for length in g.accept_lengths]
            return sum(steps) / len(steps) if steps else None

        adapter = online.adapter
        return {"method": "online", "lr": adapter.lr, "steps_per_update": adapter.steps, "updates": adapter.updates,
                "update_seconds": adapter.update_seconds,
                "stream_prompts": len(online.learned_prompts), "held_out_prompts": len(online.held_out_prompts),
                "tau_stream": tau(adapted, False), "frozen_tau_stream": tau(frozen, False),
                "tau_held_out": tau(adapted, True), "frozen_tau_held_out": tau(frozen, True),
                "saved_to": ADAPTED_DRAFTER}

    def _hf_row(self, name: str, conversations: list[Conversation], baseline: list[Conversation]) -> dict:
        generations, baseline_generations = combined(conversations), combined(baseline)
        speed, baseline_speed = tokens_per_second(generations), tokens_per_second(baseline_generations)
        same = all(outputs(mine) == outputs(plain) for mine, plain in zip(conversations, baseline))
        method = "plain" if name == HF_GENERATE else self.decoding.method.value  # assisted, prompt lookup: chains
        return {**self._row_fields(name), "method": method, "tau": None, "alpha_per_position": [],
                "speedup": speed / baseline_speed, "predicted_speedup": None, "tokens_per_s": speed, "baseline_tokens_per_s": baseline_speed,
                "cost_ratio": None, "num_prompts": len(generations),
                "new_tokens": sum(len(g.output_ids) for g in generations),
                "lossless_check": "passed" if same else "failed", "lossless_check_method": LOSSLESS_GREEDY}

    def _write_generations(self, baseline: list[Conversation], results: dict[str, list[Conversation]]) -> None:
        """One line per prompt, decoder ("plain" or the drafter's path) and turn (1, 2, …)."""
        lines = []
        for index, prompt in enumerate(self.prompts):
            rows = [("plain", baseline[index])] + [(name, runs[index]) for name, runs in results.items()]
            for drafter, conversation in rows:
                for number, turn in enumerate(conversation, start=1):
                    lines.append(json.dumps({"id": prompt.id, "category": prompt.category, "drafter": drafter,
                                             "turn": number, "prompt": prompt.turns[number - 1],
                                             "prompt_ids": turn.prompt_ids, "output_ids": turn.generation.output_ids,
                                             "accept_lengths": turn.generation.accept_lengths}) + "\n")
        write_text_atomic(self.out_dir / "generations.jsonl", "".join(lines))

    def save(self, report: dict) -> dict[str, Path]:
        written = write_report(self.out_dir, report)  # nothing else: an evaluation never writes into its inputs
        if self.online is not None:
            provenance = self.online.adapter.provenance(str(self.cfg.bench.name), self.online.learned_prompts)
            written[ADAPTED_DRAFTER] = self.online.adapter.save(self.out_dir / ADAPTED_DRAFTER, provenance)
        print("\n" + format_table(report_rows(report)))
        print(f"\nreport: {self.out_dir / 'report.md'}  (report.json, generations.jsonl, plots beside it)")
        return written


def selection_report(members: dict, hedge_row: dict, fixed_rows: list[dict]) -> dict:
    """The hedge row's `selection` (report.json): each member's share of the steps and first-position acceptance,
    and per category the regret against the best fixed drafter there (the oracle): (τ_oracle − τ_hedge) ÷ τ_oracle."""
    regret = {}
    for category, stats in (hedge_row.get("per_category") or {}).items():
        oracle = max(fixed_rows, key=lambda row: row["per_category"][category]["tau"])
        oracle_tau = oracle["per_category"][category]["tau"]
        regret[category] = {"oracle": oracle["drafter"], "oracle_tau": oracle_tau, "tau": stats["tau"],
                            "regret": (oracle_tau - stats["tau"]) / oracle_tau}
    best = max(fixed_rows, key=lambda row: row["tau"])
    return {"method": "hedge", "members": members, "regret_per_category": regret, "best_fixed": best["drafter"],
            "regret_overall": (best["tau"] - hedge_row["tau"]) / best["tau"]}


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
