"""push_export against a recording stand-in for HfApi: the calls it makes, what it uploads, the errors it turns into
one clear line, the dry run, and that the token never reaches output, logs or files. No network."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its responses make the real Hub errors below
import huggingface_hub.constants
import pytest
from huggingface_hub.hf_api import CommitInfo
from huggingface_hub.utils import hf_raise_for_status

from specdistill.distill.errors import UserError
from specdistill.export import hub
from specdistill.export.hub import NO_TOKEN, PushConfig, drafter_identity, push_export

TOKEN = "hf_testsecret123"
REPO = "my-org/llama3-eagle3"
IDENTITY = {"architectures": ["LlamaForCausalLMEagle3"], "base_model": "meta-llama/Llama-3.1-8B-Instruct",
            "drafter_kind": "eagle3"}
EXPORT_CONFIG = {"architectures": ["LlamaForCausalLMEagle3"],
                 "specdistill": {"base_model": "meta-llama/Llama-3.1-8B-Instruct", "drafter_kind": "eagle3"}}


@pytest.fixture(autouse=True)
def hub_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline, with HF_TOKEN as the only token (the machine's login cache is out of reach)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_login" / "token"))


def hub_error(status: int, url: str, error_code: str | None = None) -> Exception:
    """The exception huggingface_hub raises for this Hub answer (built by its own status mapping)."""
    response = httpx2.Response(status, request=httpx2.Request("POST", url), json={"error": "refused"},
                               headers={"X-Error-Code": error_code} if error_code else {})
    try:
        hf_raise_for_status(response)
    except Exception as error:  # noqa: BLE001 - whichever type the mapping chose is the one under test
        return error
    raise AssertionError(f"status {status} raised nothing")


class RecordingHub:
    """Stands in for HfApi: repos held in memory ({repo_id: {branch: {path: bytes}}}), every call recorded as
    (method, arguments); `fail` makes a method raise the given error."""

    def __init__(self, repos: dict | None = None, fail: dict[str, Exception] | None = None) -> None:
        self.repos = repos if repos is not None else {}
        self.fail = fail or {}
        self.calls: list[tuple[str, dict]] = []

    def _record(self, method: str, **arguments) -> None:
        self.calls.append((method, arguments))
        if method in self.fail:
            raise self.fail[method]

    def create_repo(self, repo_id: str, *, private: bool | None = None, repo_type: str | None = None,
                    exist_ok: bool = False, **kwargs) -> str:
        self._record("create_repo", repo_id=repo_id, private=private, repo_type=repo_type, exist_ok=exist_ok,
                     **kwargs)
        self.repos.setdefault(repo_id, {"main": {".gitattributes": b""}})  # the Hub's first commit
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, *, branch: str, revision: str | None = None,
                      repo_type: str | None = None, exist_ok: bool = False, **kwargs) -> None:
        self._record("create_branch", repo_id=repo_id, branch=branch, revision=revision, repo_type=repo_type,
                     **kwargs)
        self.repos[repo_id][branch] = dict(self.repos[repo_id][revision or "main"])

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str | None = None,
                        repo_type: str | None = None, cache_dir: str | None = None, **kwargs) -> str:
        self._record("hf_hub_download", repo_id=repo_id, filename=filename, revision=revision, repo_type=repo_type,
                     **kwargs)
        url = f"https://huggingface.co/{repo_id}/resolve/{revision or 'main'}/{filename}"
        if repo_id not in self.repos:
            raise hub_error(404, url, "RepoNotFound")
        if (revision or "main") not in self.repos[repo_id]:
            raise hub_error(404, url, "RevisionNotFound")
        files = self.repos[repo_id][revision or "main"]
        if filename not in files:
            raise hub_error(404, url, "EntryNotFound")
        path = Path(cache_dir) / filename
        path.write_bytes(files[filename])
        return str(path)

    def upload_folder(self, *, repo_id: str, folder_path: str, revision: str | None = None,
                      create_pr: bool | None = None, commit_message: str | None = None, **kwargs) -> CommitInfo:
        root = Path(folder_path)
        files = sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
        self._record("upload_folder", repo_id=repo_id, folder_path=folder_path, revision=revision,
                     create_pr=create_pr, commit_message=commit_message, files=files, **kwargs)
        branch = "refs/pr/1" if create_pr else revision or "main"
        self.repos[repo_id].setdefault(branch, {}).update({name: (root / name).read_bytes() for name in files})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd", commit_message=commit_message,
                          commit_description="", oid="0123abcd",
                          pr_url=f"https://huggingface.co/{repo_id}/discussions/1" if create_pr else None)

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]

    def arguments(self, method: str) -> dict:
        return next(arguments for name, arguments in self.calls if name == method)


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(EXPORT_CONFIG))
    (folder / "model.safetensors").write_bytes(b"\0" * 3 * 1024 * 1024)  # 3.0 MiB
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# drafter\n")
    (folder / "tokenizer" / "special_tokens_map.json").write_text("{}")
    return folder


def files_under(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def repo_with_config(config: dict, branch: str = "main") -> dict:
    return {REPO: {"main": {".gitattributes": b""}, branch: {"config.json": json.dumps(config).encode()}}}


def test_push_creates_the_repo_and_uploads_every_file(export_dir: Path) -> None:
    api = RecordingHub()
    url = push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY, api=api)

    assert api.methods() == ["create_repo", "hf_hub_download", "upload_folder"]
    assert api.arguments("create_repo") == {"repo_id": REPO, "private": True, "repo_type": "model", "exist_ok": True}
    upload = api.arguments("upload_folder")
    assert (upload["repo_id"], upload["revision"], upload["create_pr"]) == (REPO, None, False)
    assert upload["files"] == sorted(files_under(export_dir))
    assert upload["commit_message"] == "specdistill export: eagle3 drafter for meta-llama/Llama-3.1-8B-Instruct"
    assert url == f"https://huggingface.co/{REPO}/commit/0123abcd"


def test_push_public_to_a_new_branch_creates_the_branch_first(export_dir: Path) -> None:
    # main holds another drafter: a branch of its own is the way to put this one beside it
    other = {"architectures": ["LlamaForCausalLMEagle3"], "speculators_config": {"verifier": {"name_or_path": "x/y"}}}
    api = RecordingHub(repo_with_config(other))
    push = PushConfig(repo_id=REPO, private=False, revision="llama3.1", commit_message="second drafter")
    push_export(export_dir, push, IDENTITY, api=api)

    assert api.methods() == ["create_repo", "hf_hub_download", "create_branch", "upload_folder"]
    assert api.arguments("create_repo")["private"] is False
    assert api.arguments("hf_hub_download")["revision"] == "llama3.1"
    assert api.arguments("create_branch") == {"repo_id": REPO, "branch": "llama3.1", "revision": None,
                                              "repo_type": "model"}
    upload = api.arguments("upload_folder")
    assert (upload["revision"], upload["commit_message"]) == ("llama3.1", "second drafter")


def test_push_as_a_pull_request_returns_its_url(export_dir: Path) -> None:
    api = RecordingHub()
    url = push_export(export_dir, PushConfig(repo_id=REPO, create_pr=True), IDENTITY, api=api)
    assert api.arguments("upload_folder")["create_pr"] is True
    assert url == f"https://huggingface.co/{REPO}/discussions/1"


def test_the_same_drafter_gets_a_new_commit(export_dir: Path) -> None:
    api = RecordingHub(repo_with_config(EXPORT_CONFIG))
    push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY, api=api)
    assert api.methods()[-1] == "upload_folder"


@pytest.mark.parametrize("remote, field", [
    ({"architectures": ["LlamaForCausalLMEagle3"],
      "speculators_config": {"verifier": {"name_or_path": "Qwen/Qwen3-8B"}}}, "base_model"),
    ({"architectures": ["Eagle3Speculator"]}, "architectures"),
    ({"model_type": "specdistill_medusa"}, "drafter_kind"),
])
def test_another_drafter_in_the_repo_is_refused_naming_the_field(export_dir: Path, remote: dict, field: str) -> None:
    api = RecordingHub(repo_with_config(remote))
    with pytest.raises(UserError) as error:
        push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY, api=api)
    message = str(error.value)
    assert REPO in message and f"{field} " in message and "push.revision" in message
    assert "upload_folder" not in api.methods()


@pytest.mark.parametrize("kind_key", ["drafter_kind", "specdistill_kind"])  # ours, and what older versions wrote
def test_a_vllm_layout_repo_is_compared_through_its_specdistill_export_json(export_dir: Path, kind_key: str) -> None:
    """vLLM's EAGLE-3 config names neither base model nor kind; the export's specdistill_export.json does."""
    repos = repo_with_config({"architectures": ["LlamaForCausalLMEagle3"]})
    repos[REPO]["main"]["specdistill_export.json"] = json.dumps(
        {"target_name_or_path": "Qwen/Qwen3-8B", kind_key: "eagle1"}).encode()
    api = RecordingHub(repos)
    with pytest.raises(UserError, match="base_model 'Qwen/Qwen3-8B' there.*drafter_kind 'eagle1' there"):
        push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY, api=api)
    assert "upload_folder" not in api.methods()


def test_no_token_is_one_clear_error(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    api = RecordingHub()
    with pytest.raises(UserError) as error:
        push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY, api=api)
    assert str(error.value) == NO_TOKEN
    assert api.calls == []


@pytest.mark.parametrize("method, error, expected", [
    ("create_repo", hub_error(403, "https://huggingface.co/api/repos/create"), "403 Forbidden"),
    ("create_repo", hub_error(401, "https://huggingface.co/api/repos/create"), "hf auth login"),
    ("upload_folder", hub_error(404, f"https://huggingface.co/api/models/{REPO}/preupload/main", "RepoNotFound"),
     "not found or your token cannot access it"),
])
def test_hub_refusals_are_one_clear_error_naming_the_repo(export_dir: Path, method: str, error: Exception,
                                                          expected: str) -> None:
    with pytest.raises(UserError) as raised:
        push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY, api=RecordingHub(fail={method: error}))
    message = str(raised.value)
    assert REPO in message and expected in message and "\n" not in message and TOKEN not in message


@pytest.mark.parametrize("repo_id", ["just-a-name", "org/name/extra", "org/bad..name", "org/", "", None])
def test_an_invalid_repo_id_fails_before_any_call(export_dir: Path, repo_id: str | None) -> None:
    api = RecordingHub()
    with pytest.raises(UserError, match="push.repo_id"):
        push_export(export_dir, PushConfig(repo_id=repo_id), IDENTITY, api=api)
    assert api.calls == []


def test_a_pull_request_to_a_branch_is_refused(export_dir: Path) -> None:
    with pytest.raises(UserError, match="push.create_pr"):
        push_export(export_dir, PushConfig(repo_id=REPO, revision="dev", create_pr=True), IDENTITY, api=RecordingHub())


def test_dry_run_lists_every_file_with_sizes_without_token_or_calls(export_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub, "HfApi", None)  # building a client at all would fail
    api = RecordingHub()
    listing = push_export(export_dir, PushConfig(repo_id=REPO, revision="dev", dry_run=True), IDENTITY, api=api)

    assert api.calls == []
    assert REPO in listing and "branch dev" in listing and "private" in listing
    lines = {line.split()[0]: line for line in listing.splitlines()[1:]}
    assert set(lines) == set(files_under(export_dir)) | {"total"}
    assert lines["model.safetensors"].endswith("3.0 MiB")
    assert lines["tokenizer/special_tokens_map.json"].endswith(" 2 B")
    assert lines["total"].endswith("3.0 MiB")


def test_the_token_reaches_no_output_log_or_file(export_dir: Path, capsys: pytest.CaptureFixture,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    before = files_under(export_dir)
    caplog.set_level(logging.DEBUG)
    push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY, api=RecordingHub())
    with pytest.raises(UserError) as error:  # and not in an error message either
        push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY,
                    api=RecordingHub(fail={"create_repo": hub_error(403, "https://huggingface.co/api/repos/create")}))

    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text + str(error.value)
    assert "uploading 4 files" in caplog.text  # the log is captured, so the check above is not vacuous
    assert files_under(export_dir) == before  # push writes nothing into the export


def test_a_file_holding_the_token_is_not_uploaded(export_dir: Path) -> None:
    (export_dir / "resolved_config.yaml").write_text(f"hub:\n  token: {TOKEN}\n")
    api = RecordingHub()
    with pytest.raises(UserError, match="resolved_config.yaml contains your Hugging Face token") as error:
        push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY, api=api)
    assert TOKEN not in str(error.value)
    assert api.calls == []


def test_without_an_api_the_client_gets_the_environment_token(export_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str | None] = []
    stand_in = RecordingHub()

    def client(token: str | None = None) -> RecordingHub:
        built.append(token)
        return stand_in

    monkeypatch.setattr(hub, "HfApi", client)
    push_export(export_dir, PushConfig(repo_id=REPO), IDENTITY)
    assert built == [TOKEN] and stand_in.methods()[-1] == "upload_folder"


def test_drafter_identity_reads_each_layout() -> None:
    assert drafter_identity(EXPORT_CONFIG) == IDENTITY
    speculators = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                   "speculators_config": {"verifier": {"name_or_path": "Qwen/Qwen3-8B"}}}
    assert drafter_identity(speculators) == {"architectures": ["Eagle3Speculator"], "base_model": "Qwen/Qwen3-8B",
                                             "drafter_kind": "eagle3"}
    own = {"model_type": "specdistill_eagle1", "target_name_or_path": "lmsys/vicuna-7b-v1.3"}
    assert drafter_identity(own) == {"base_model": "lmsys/vicuna-7b-v1.3", "drafter_kind": "eagle1"}
    older = {"architectures": ["LlamaForCausalLMEagle3"], "specdistill": {"draft_kind": "eagle3"}}  # an older push
    assert drafter_identity(older) == {"architectures": ["LlamaForCausalLMEagle3"], "drafter_kind": "eagle3"}
    assert drafter_identity({"model_type": "llama"}) == {}
