"""Toy target LLM: a small Llama model and BPE tokenizer trained on the Python stdlib.

No model downloads are possible in tests or in the quickstart, so this module
builds a stand-in target from data that every Python install carries: the
standard library's own ``*.py`` files. Files are split deterministically by a
hash of their path into three disjoint sets:

* ``target`` (~88%): trains the toy target (tokenizer and model);
* ``chat`` (~10%): held out; becomes drafter training conversations;
* ``bench`` (~2%): held out; becomes evaluation prompts.

The target learns plain source and a chat form (the user gives the start of a
code chunk, the assistant continues it), so it answers sensibly when prompted
through its chat template. ``ensure_toy_target`` builds it once per config and
caches it; builds are deterministic for a given config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sys
import sysconfig
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from specdistill.distill.errors import UserError
from specdistill.distill.outputs import replace_folder
from specdistill.distill.schedule import lr_factor

log = logging.getLogger(__name__)

# Bump when the build recipe changes in a way that changes the result.
BUILD_VERSION = 2

ENDOFTEXT = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [ENDOFTEXT, SYSTEM, USER, ASSISTANT, END_OF_TURN]

TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SYSTEM_PROMPTS = (
    "You are a Python expert. Continue the code.",
    "You are a helpful coding assistant. Continue the given Python source.",
)
CONTINUE_PROMPT = "Continue."
# Conversation shape: line counts per turn and a per-turn cap in UTF-8 bytes. Byte-level
# BPE never makes more tokens than bytes, so a conversation (at most 3 capped turns plus
# short prompts) stays under ~1300 tokens even for non-ASCII text (~350 for typical code).
MIN_TURN_LINES, MAX_TURN_LINES = 3, 16
MAX_TURN_BYTES = 400
SYSTEM_PROMPT_PROB = 0.3
MULTI_TURN_PROB = 0.3
# A few stdlib files are huge generated tables; capping each file keeps the corpus varied.
MAX_FILE_CHARS = 16_000


@dataclass
class ToyTargetConfig:
    """Every build setting of the toy target; all fields are part of the cache key."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 768
    max_position_embeddings: int = 2048
    seq_len: int = 256
    # CPU compute is the bottleneck: small batches (more optimizer steps for the same
    # tokens) learned fastest in measurements; ~3 minutes on 2 cores.
    batch_size: int = 4
    steps: int = 720
    lr: float = 2e-3
    warmup_steps: int = 30
    chat_fraction: float = 0.5  # share of training sequences in chat form
    max_corpus_chars: int = 3_000_000  # cap on target-split text read, for speed
    eval_sequences: int = 256  # held-out sequences of seq_len tokens scored at the end
    weight_decay: float = 0.1
    seed: int = 0


# ---------------------------------------------------------------------------
# Data: stdlib files, splits, conversations
# ---------------------------------------------------------------------------


def stdlib_source_files() -> list[tuple[str, Path]]:
    """All stdlib ``*.py`` files (outside site-packages) as sorted (relative posix path, absolute path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or not path.is_file():
            continue
        files.append((rel.as_posix(), path))
    return sorted(files)


def toy_split(relpath: str) -> str:
    """Split of a stdlib file: "target" (~88%), "chat" (~10%) or "bench" (~2%), from a stable hash."""
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % 1000
    if bucket < 880:
        return "target"
    if bucket < 980:
        return "chat"
    return "bench"


def _read_source(path: Path) -> str:
    # A few stdlib test files are deliberately not UTF-8; keep them readable anyway.
    text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
    return text[:MAX_FILE_CHARS]


def _split_sources(splits: Iterable[str], seed: int, max_chars: int | None = None) -> list[tuple[str, str]]:
    """(relpath, text) of the files of the given splits, in a seeded shuffled order, up to max_chars in total.

    Shuffling before capping makes a capped corpus a fair sample of the whole stdlib
    rather than its alphabetically first packages.
    """
    wanted = set(splits)
    paths = [(rel, path) for rel, path in stdlib_source_files() if toy_split(rel) in wanted]
    random.Random(f"sources:{seed}").shuffle(paths)
    sources, total = [], 0
    for rel, path in paths:
        text = _read_source(path)
        if not text.strip():
            continue
        sources.append((rel, text))
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return sources


def _take_turn(lines: list[str], start: int, rng: random.Random) -> tuple[str, int]:
    """A chunk of a few lines starting at ``start``, capped at MAX_TURN_BYTES; returns (text, next start)."""
    want = rng.randint(MIN_TURN_LINES, MAX_TURN_LINES)
    taken: list[str] = []
    size = 0
    for line in lines[start : start + want]:
        line_bytes = len(line.encode()) + 1
        if taken and size + line_bytes > MAX_TURN_BYTES:
            break
        if line_bytes > MAX_TURN_BYTES:  # a single overlong line: keep its start only
            line = line.encode()[:MAX_TURN_BYTES].decode(errors="ignore")
            line_bytes = len(line.encode()) + 1
        taken.append(line)
        size += line_bytes
    return "\n".join(taken), start + max(len(taken), 1)


def _file_conversations(text: str, rng: random.Random) -> list[dict]:
    """Walk one file from top to bottom, cutting it into continuation conversations."""
    lines = text.split("\n")
    conversations = []
    pos = 0
    while pos < len(lines):
        messages = []
        if rng.random() < SYSTEM_PROMPT_PROB:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        prompt, pos = _take_turn(lines, pos, rng)
        answer, pos = _take_turn(lines, pos, rng)
        if not prompt.strip() or not answer.strip():
            continue
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if rng.random() < MULTI_TURN_PROB and pos < len(lines):
            more, pos = _take_turn(lines, pos, rng)
            if more.strip():
                messages += [{"role": "user", "content": CONTINUE_PROMPT}, {"role": "assistant", "content": more}]
        conversations.append({"messages": messages})
    return conversations


def _conversations_from_sources(sources: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    conversations = []
    for _, text in sources:
        conversations += _file_conversations(text, rng)
    rng.shuffle(conversations)
    return conversations


def toy_chat_conversations(split: str = "chat", seed: int = 0, max_conversations: int | None = None) -> list[dict]:
    """Continuation conversations ({"messages": [...]}) cut from the files of one split, deterministic for (split, seed)."""
    sources = _split_sources([split], seed)
    conversations = _conversations_from_sources(sources, random.Random(f"chat:{split}:{seed}"))
    return conversations[:max_conversations] if max_conversations is not None else conversations


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """TOY_CHAT_TEMPLATE in plain Python (no Jinja needed when building training text)."""
    text = "".join(f"<|{m['role']}|>{m['content']}{END_OF_TURN}\n" for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def train_toy_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on ``texts``, with SPECIAL_TOKENS first in the vocab."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer saved with the toy target."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TURN,
        pad_token=ENDOFTEXT,
        chat_template=TOY_CHAT_TEMPLATE,
    )


def _token_stream(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """Token ids of the texts, each followed by <|endoftext|>."""
    eot = tokenizer.token_to_id(ENDOFTEXT)
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += encoding.ids
        stream.append(eot)
    return stream


def _chunk(stream: list[int], seq_len: int) -> torch.Tensor:
    """The stream cut into whole rows of seq_len tokens (the remainder is dropped)."""
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


# ---------------------------------------------------------------------------
# Training data, model, training loop, evaluation
# ---------------------------------------------------------------------------


def _draw_rows(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` rows of ``pool``: whole shuffled passes, repeated as needed."""
    if count == 0:
        return pool[:0]
    if len(pool) == 0:
        raise UserError(
            "target.toy: the toy target's corpus gives no training row of target.toy.seq_len tokens; raise "
            "target.toy.max_corpus_chars or lower target.toy.seq_len (target=toy's own values work)"
        )
    passes = math.ceil(count / len(pool))
    order = torch.cat([torch.randperm(len(pool), generator=generator) for _ in range(passes)])
    return pool[order[:count]]


def _training_rows(cfg: ToyTargetConfig, tokenizer: Tokenizer, sources: list[tuple[str, str]]) -> torch.Tensor:
    """steps * batch_size training rows in training order: a chat_fraction share in chat form, the rest plain source."""
    texts = [text for _, text in sources]
    plain = _chunk(_token_stream(tokenizer, texts), cfg.seq_len)
    conversations = _conversations_from_sources(sources, random.Random(f"target-chat:{cfg.seed}"))
    chat = _chunk(_token_stream(tokenizer, [render_chat(c["messages"]) for c in conversations]), cfg.seq_len)

    generator = torch.Generator().manual_seed(cfg.seed)
    total = cfg.steps * cfg.batch_size
    num_chat = round(cfg.chat_fraction * total)
    rows = torch.cat([_draw_rows(chat, num_chat, generator), _draw_rows(plain, total - num_chat, generator)])
    return rows[torch.randperm(total, generator=generator)]


def _heldout_rows(cfg: ToyTargetConfig, tokenizer: Tokenizer) -> torch.Tensor:
    """Up to eval_sequences rows of plain source, evenly spaced over all held-out (chat + bench) files.

    Spreading the rows over every held-out file (rather than taking the first few
    files) keeps one unusual file from dominating the score.
    """
    sources = _split_sources(["chat", "bench"], cfg.seed)
    rows = _chunk(_token_stream(tokenizer, [text for _, text in sources]), cfg.seq_len)
    picks = torch.linspace(0, len(rows) - 1, min(cfg.eval_sequences, len(rows))).round().long()
    return rows[picks]


def _build_model(cfg: ToyTargetConfig, tokenizer: Tokenizer) -> LlamaForCausalLM:
    eos_ids = [tokenizer.token_to_id(END_OF_TURN), tokenizer.token_to_id(ENDOFTEXT)]
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.token_to_id(ENDOFTEXT),
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=eos_ids, pad_token_id=tokenizer.token_to_id(ENDOFTEXT)
    )
    return model


def _train(model: LlamaForCausalLM, rows: torch.Tensor, cfg: ToyTargetConfig) -> None:
    # No weight decay on norms (1-d parameters), as usual for transformers.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    # linear warm-up, then cosine decay to 10% of the peak learning rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, cfg.steps, "cosine", floor=0.1))
    model.train()
    progress = tqdm(range(cfg.steps), desc="toy target", unit="step")
    for step in progress:
        batch = rows[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def _model_loss(model: LlamaForCausalLM, rows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over all rows (all rows have the same length)."""
    total = sum(model(input_ids=batch, labels=batch).loss.item() * len(batch) for batch in rows.split(batch_size))
    return total / len(rows)


def _unigram_loss(train_rows: torch.Tensor, eval_rows: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) on the same targets as _model_loss of an add-one-smoothed unigram fit on train_rows."""
    counts = torch.bincount(train_rows.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return -log_probs[eval_rows[:, 1:].flatten()].mean().item()


# ---------------------------------------------------------------------------
# Build and cache
# ---------------------------------------------------------------------------


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def build_settings(cfg: ToyTargetConfig) -> dict:
    """The ToyTargetConfig fields of cfg: a subclass may add values that only matter when loading the built target."""
    return {setting.name: getattr(cfg, setting.name) for setting in fields(ToyTargetConfig)}


def toy_target_cache_key(cfg: ToyTargetConfig) -> str:
    """Short hex key of the build settings, BUILD_VERSION and the Python version (whose stdlib is the corpus)."""
    payload = {"config": build_settings(cfg), "build_version": BUILD_VERSION, "python": _python_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_toy_target(cfg: ToyTargetConfig, out_dir: str | Path) -> dict:
    """Train tokenizer and model and save them into out_dir (no caching); returns build_info."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    sources = _split_sources(["target"], cfg.seed, max_chars=cfg.max_corpus_chars)
    tokenizer = train_toy_tokenizer([text for _, text in sources], cfg.vocab_size)
    if tokenizer.get_vocab_size() > cfg.vocab_size:  # its 256 byte tokens and special tokens are always there
        raise UserError(
            f"target.toy.vocab_size: {cfg.vocab_size} is below the {tokenizer.get_vocab_size()} tokens the toy's "
            f"byte-level tokenizer always has; set target.toy.vocab_size to at least {tokenizer.get_vocab_size()}"
        )
    train_rows = _training_rows(cfg, tokenizer, sources)
    eval_rows = _heldout_rows(cfg, tokenizer)

    model = _build_model(cfg, tokenizer)
    _train(model, train_rows, cfg)
    heldout_loss = _model_loss(model, eval_rows, cfg.batch_size)
    unigram_loss = _unigram_loss(train_rows, eval_rows, cfg.vocab_size)

    model.save_pretrained(out_dir)
    wrap_tokenizer(tokenizer).save_pretrained(out_dir)
    info = {
        "build_seconds": round(time.perf_counter() - started, 2),
        "heldout_loss": heldout_loss,
        "unigram_loss": unigram_loss,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tokens_trained": cfg.steps * cfg.batch_size * cfg.seq_len,
        "steps": cfg.steps,
        "config": build_settings(cfg),
        "python": _python_version(),
        "key": toy_target_cache_key(cfg),
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "toy target built in %.1fs: held-out loss %.3f nats (unigram %.3f), %d params, %d tokens",
        info["build_seconds"], heldout_loss, unigram_loss, info["num_parameters"], info["tokens_trained"],
    )
    return info


def ensure_toy_target(cfg: ToyTargetConfig, cache_dir: str | Path) -> Path:
    """Folder <cache_dir>/toy_target/<key>/ holding the built toy target; built on first use only.

    The build goes into a staging folder that is renamed into place (distill/outputs.py
    `replace_folder`), so a folder at the final path is always complete; a file lock keeps
    concurrent processes from building the same key twice (the second waits, then reuses).
    """
    root = Path(cache_dir) / "toy_target"
    key = toy_target_cache_key(cfg)
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if final.is_dir():
            return final
        # holding the lock, a staging folder of this key is left over from a killed build: replace_folder clears it
        with replace_folder(final) as staging:
            build_toy_target(cfg, staging)
    return final
