"""Upload an export folder to the Hugging Face Hub: the `push.` group of `specdistill export`.

    specdistill export drafter_path=... format=vllm push.repo_id=org/name                  # upload (a new commit)
    specdistill export drafter_path=... push.repo_id=org/name push.dry_run=true             # list what would go up
    specdistill export drafter_path=... push.repo_id=org/name push.revision=qwen3-8b        # to a branch of its own

The token comes only from the environment (`HF_TOKEN`) or the login cache (`hf auth login`), through
`huggingface_hub.get_token()`; it never goes through a config, a log line, a message or a file.

A repo holds one drafter: before uploading, the repo's `config.json` (on the branch the upload goes to) is compared
with the export's identity (`drafter_identity`), and a different drafter is refused. A branch that does not exist
yet is created from main and not compared, so `push.revision=<new branch>` is the way to put another drafter
beside an existing one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import (HfHubHTTPError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id

from specdistill.distill.drafters.registry import MODEL_TYPE_PREFIX
from specdistill.distill.errors import UserError
from specdistill.distill.outputs import STAGE_MARKER

log = logging.getLogger("specdistill.export")

NO_TOKEN = "push: no Hugging Face token; run `hf auth login` or set HF_TOKEN"
# the fields that tell one drafter from another (see drafter_identity)
IDENTITY_KEYS = ("architectures", "base_model", "drafter_kind")
# files small and textual enough to search for a leaked token before uploading (weights are never searched)
TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".jinja", ".py", ".cfg", ".toml"}
MAX_SEARCHED_BYTES = 16 * 2**20
IGNORED = [*DEFAULT_IGNORE_PATTERNS, STAGE_MARKER]  # the export's own marker stays out of the repo


@dataclass
class PushConfig:
    """The `push.` group of `specdistill export` (Hydra schema: a misspelled key fails at start)."""

    repo_id: Optional[str] = None  # org/name on the Hub; None: do not push
    private: bool = True  # applies when the repo is created; an existing repo keeps its visibility
    revision: Optional[str] = None  # branch to upload to (created from main if missing); None: main
    create_pr: bool = False  # open a pull request against main instead of committing to it
    dry_run: bool = False  # list the files and sizes that would be uploaded; no network, no token needed
    commit_message: Optional[str] = None  # None: "specdistill export: <drafter kind> drafter for <base model>"


def push_export(folder: Path, push: PushConfig, identity: dict, api: HfApi | None = None) -> str:
    """Upload `folder` to `push.repo_id` and return the commit URL (the PR URL with `push.create_pr`); with
    `push.dry_run`, return the listing of what would be uploaded instead, without a token or any network call.

    `identity` describes the exported drafter with `IDENTITY_KEYS` (`drafter_identity` of its config.json gives
    it); `api` replaces the `HfApi` client (tests pass a stand-in). The caller prints the returned text; the upload
    shows huggingface_hub's own progress bars."""
    folder = Path(folder)
    repo_id = checked_repo_id(push)
    files = upload_files(folder)
    if push.dry_run:
        return dry_run_listing(folder, files, repo_id, push)
    token = hub_token()
    refuse_leaked_token(folder, files, token)
    api = api or HfApi(token=token)
    with hub_errors(repo_id):
        api.create_repo(repo_id, private=push.private, exist_ok=True, repo_type="model")
        try:
            remote = remote_config(api, repo_id, push.revision)
        except RevisionNotFoundError:  # a new branch: nothing on it to compare with
            api.create_branch(repo_id, branch=push.revision, repo_type="model")
        else:
            if remote is not None:
                check_same_drafter(remote, identity, repo_id, push.revision)
        log.info("push: uploading %d files (%s) to %s", len(files), human_size(total_size(folder, files)),
                 destination(repo_id, push))
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   revision=push.revision, create_pr=push.create_pr, ignore_patterns=IGNORED,
                                   commit_message=push.commit_message or default_commit_message(identity))
    return commit_link(commit)


def drafter_identity(config: dict) -> dict:
    """What a config.json says about its drafter, as {"architectures", "base_model", "drafter_kind"} (absent keys
    left out). Read from, in order of preference:

    - architectures: `architectures`
    - base_model: a `specdistill.base_model` block, `speculators_config.verifier.name_or_path` (speculators
      format), `target_name_or_path` (specdistill's own layout)
    - drafter_kind: `specdistill.drafter_kind` (`specdistill.draft_kind` in repos pushed by older versions),
      `speculators_model_type`, a `model_type` of `specdistill_<kind>`

    A layout with none of these (e.g. vLLM's plain Llama EAGLE-3 config) is compared by `architectures` alone,
    unless the exporter writes the `specdistill` block."""
    own = config.get("specdistill") if isinstance(config.get("specdistill"), dict) else {}
    verifier = (config.get("speculators_config") or {}).get("verifier") or {}
    model_type = str(config.get("model_type") or "")
    candidates = {
        "architectures": [config.get("architectures")],
        "base_model": [own.get("base_model"), verifier.get("name_or_path"), config.get("target_name_or_path")],
        "drafter_kind": [own.get("drafter_kind"), own.get("draft_kind"), config.get("speculators_model_type"),
                         model_type.removeprefix(MODEL_TYPE_PREFIX) if model_type.startswith(MODEL_TYPE_PREFIX)
                         else None],
    }
    return {key: next(value for value in values if value) for key, values in candidates.items() if any(values)}


# ---------------------------------------------------------------------------------------------------------------
# Checks made before any network call


def checked_repo_id(push: PushConfig) -> str:
    """push.repo_id, which must be `org/name` with the Hub's allowed characters."""
    repo_id = push.repo_id
    if not repo_id:
        raise UserError("push.repo_id: not set; pass push.repo_id=<org>/<name> to upload the export")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"push.repo_id: {repo_id!r} is not a valid Hub repo id ({error})") from None
    if repo_id.count("/") != 1:  # the Hub accepts bare names only for legacy repos; a new one needs its owner
        raise UserError(f"push.repo_id: {repo_id!r} must be <org or user>/<name>, e.g. my-org/llama3-8b-drafter")
    if push.create_pr and push.revision:
        raise UserError("push.create_pr: a pull request is always opened against main, so it cannot go to "
                        f"push.revision={push.revision!r}; set one of the two")
    return repo_id


def upload_files(folder: Path) -> list[str]:
    """The files `upload_folder` would send, as POSIX paths relative to `folder`, in the same order and with the
    same default exclusions (.git, .cache/huggingface)."""
    if not folder.is_dir():
        raise UserError(f"push: {folder} is not a folder; run the export first")
    relative = [path.relative_to(folder).as_posix() for path in sorted(folder.glob("**/*")) if path.is_file()]
    files = list(filter_repo_objects(relative, ignore_patterns=IGNORED))
    if not files:
        raise UserError(f"push: {folder} holds no files to upload; run the export first")
    return files


def hub_token() -> str:
    """The token from HF_TOKEN or the login cache; never from a config."""
    token = get_token()
    if not token:
        raise UserError(NO_TOKEN)
    return token


def refuse_leaked_token(folder: Path, files: list[str], token: str) -> None:
    """Refuse to upload a text file that holds the token (e.g. a config copied with a secret in it)."""
    needle = token.encode()
    for name in files:
        path = folder / name
        if path.suffix in TEXT_SUFFIXES and path.stat().st_size <= MAX_SEARCHED_BYTES and needle in path.read_bytes():
            raise UserError(f"push: {path} contains your Hugging Face token; remove it from that file and export "
                            "again (nothing was uploaded)")


# ---------------------------------------------------------------------------------------------------------------
# The repo's current drafter


def remote_config(api: HfApi, repo_id: str, revision: str | None) -> dict | None:
    """The repo's config.json on `revision` (None: main), or None when it has none, with the drafter's base model and
    kind from specdistill_export.json when the config names neither. Raises RevisionNotFoundError when the branch
    does not exist."""
    try:
        config = remote_json(api, repo_id, "config.json", revision)
    except RemoteEntryNotFoundError:
        return None
    if not isinstance(config, dict):
        raise UserError(f"push: {repo_id} already holds a config.json that is not a model config; push to another "
                        "push.repo_id, or to a new branch with push.revision=<name>")
    try:  # what `specdistill export` writes beside the engine's files
        provenance = remote_json(api, repo_id, "specdistill_export.json", revision)
    except RemoteEntryNotFoundError:
        provenance = None
    if isinstance(provenance, dict) and "specdistill" not in config:  # engine configs (vLLM's Llama one) name neither
        # older exports recorded the kind as specdistill_kind
        config["specdistill"] = {"base_model": provenance.get("target_name_or_path"),
                                 "drafter_kind": provenance.get("drafter_kind") or provenance.get("specdistill_kind")}
    return config


def remote_json(api: HfApi, repo_id: str, filename: str, revision: str | None) -> Any:
    """A JSON file of the repo on `revision`: its value, or None when it is not valid JSON. Raises
    RemoteEntryNotFoundError when the repo has no such file."""
    with tempfile.TemporaryDirectory() as cache_dir:  # a throw-away cache: the file is read once, here
        path = api.hf_hub_download(repo_id, filename, revision=revision, repo_type="model", cache_dir=cache_dir)
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None


def check_same_drafter(remote: dict, identity: dict, repo_id: str, revision: str | None) -> None:
    """Refuse to upload over another drafter: compare the identity fields both sides record."""
    theirs = drafter_identity(remote)
    differences = [f"{key} {_plain(theirs[key])!r} there, {_plain(identity[key])!r} here"
                   for key in IDENTITY_KEYS
                   if identity.get(key) and theirs.get(key) and _plain(identity[key]) != _plain(theirs[key])]
    if differences:
        where = f"branch {revision!r} of {repo_id}" if revision else repo_id
        raise UserError(f"push: {where} already holds another drafter ({'; '.join(differences)}); push to another "
                        "push.repo_id, or to a new branch of this repo with push.revision=<name>")


def _plain(value: Any) -> Any:
    """Lists and tuples compare equal (a config read from JSON has lists, one built in code may have tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------------------------
# Errors, messages, listing


@contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """Turn the Hub's refusals into one line that names the repo and says what to do."""
    namespace = repo_id.split("/")[0]
    try:
        yield
    except OfflineModeIsEnabled:
        raise UserError("push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or list the files "
                        "with push.dry_run=true") from None
    except RepositoryNotFoundError:  # also what the Hub answers for a private repo the token cannot see
        raise UserError(f"push: {repo_id} was not found or your token cannot access it; check push.repo_id and that "
                        f"your token (`hf auth whoami`) has write access to {namespace!r}") from None
    except HfHubHTTPError as error:
        status = error.response.status_code
        if status == 401:
            raise UserError(f"push: the Hub refused your token for {repo_id} (401 Unauthorized); run `hf auth login` "
                            "again or set a valid HF_TOKEN") from None
        if status == 403:
            raise UserError(f"push: your token may not write to {repo_id} (403 Forbidden); use a token with write "
                            f"access to {namespace!r} (a fine-grained token needs write permission on it), or push "
                            "to a repo of your own") from None
        reason = error.server_message or str(error).strip().splitlines()[0]
        raise UserError(f"push: the Hub refused the upload to {repo_id} ({status}: {reason})") from None
    except Exception as error:
        if not is_network_error(error):
            raise
        raise UserError(f"push: cannot reach the Hub to upload to {repo_id} ({type(error).__name__}: {error}); check "
                        "this machine's network (or HF_ENDPOINT), then run the same command again; "
                        "push.dry_run=true lists the files without a network") from None


def is_network_error(error: Exception) -> bool:
    """A connection or timeout failure of the Hub client's HTTP library (httpx, httpx2 or requests, by version)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, (ConnectionError, TimeoutError)) or bool(names & {"TransportError", "ConnectionError",
                                                                              "Timeout"})


def commit_link(commit: Any) -> str:
    """The PR URL when the upload opened one, else the commit URL (`upload_folder` returns a CommitInfo)."""
    return getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or str(commit)


def default_commit_message(identity: dict) -> str:
    kind = identity.get("drafter_kind") or "speculative-decoding"
    base = f" for {identity['base_model']}" if identity.get("base_model") else ""
    return f"specdistill export: {kind} drafter{base}"


def destination(repo_id: str, push: PushConfig) -> str:
    if push.create_pr:
        return f"{repo_id} (a pull request to main)"
    return f"{repo_id} (branch {push.revision or 'main'})"


def dry_run_listing(folder: Path, files: list[str], repo_id: str, push: PushConfig) -> str:
    """Every file that would be uploaded, with its size, and the total."""
    sizes = [(folder / name).stat().st_size for name in files]
    width = max(len(name) for name in files)
    visibility = "private" if push.private else "public"
    lines = [f"push (dry run, nothing uploaded): {len(files)} files would go to {destination(repo_id, push)}, "
             f"{visibility} if the repo is created"]
    lines += [f"  {name:<{width}}  {human_size(size):>10}" for name, size in zip(files, sizes)]
    lines.append(f"  {'total':<{width}}  {human_size(sum(sizes)):>10}")
    return "\n".join(lines)


def total_size(folder: Path, files: list[str]) -> int:
    return sum((folder / name).stat().st_size for name in files)


def human_size(num_bytes: int) -> str:
    """1023 B, 1.5 KiB, 12.3 MiB, 4.2 GiB."""
    exponent = min(max(num_bytes.bit_length() - 1, 0) // 10, 4)  # powers of 1024, up to TiB
    if exponent == 0:
        return f"{num_bytes} B"
    return f"{num_bytes / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[exponent - 1]}"
