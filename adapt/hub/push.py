"""`dlm-adapt push` / `adapt.push_to_hub`: publish a diffusion checkpoint or a PEFT adapter of one on the Hugging
Face Hub, with a model card that says what it is, how it was made, and how to load it with transformers alone.

DIR is validated (`checkpoint.validate`: it must load with transformers alone) before anything is contacted, and
never written to: the model card (DIR's own README.md merged
with the generated section and metadata) is uploaded from memory as one more operation of the same commit.
Everything goes up in one commit through huggingface_hub (repo creation, upload modes, LFS/Xet for large files,
retries of idempotent requests); a failed commit is retried here as a whole, which is safe because files that
already reached the Hub are recognised and skipped. The card itself is `card`.
"""

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .card import build_card
from .plan import Plan
from ..checkpoint import ADAPTER_FILES, NotDiffusionError, Validated, detect, validate, validate_adapter
from ..config import PushOptions
from ..errors import AdaptError, first_line
from ..training.run_dir import training_record

# a failed commit POST is not retried by huggingface_hub; these are the waits before our further attempts
COMMIT_RETRY_DELAYS = (1.0, 4.0)
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class PushResult:
    """What was (or, for a dry run, would be) uploaded: `files` as (path in repo, bytes), README.md included."""

    repo_id: str
    revision: str
    kind: str  # "checkpoint" or "adapter"
    files: list[tuple[str, int]]
    card: str
    url: str
    dry_run: bool
    commit_url: str | None = None

    def listing(self) -> str:
        width = max(len(f"{size:,}") for _, size in self.files)
        lines = [f"  {size:>{width},}  {path}" + ("  (model card)" if path == "README.md" else "")
                 for path, size in self.files]
        total = sum(size for _, size in self.files)
        lines.append(f"  {total:>{width},}  total, {len(self.files)} files")
        return "\n".join(lines)

    def report(self) -> str:
        if self.dry_run:
            return (f"dry run (nothing contacted): would push this {self.kind} to {self.url} "
                    f"(branch {self.revision}) in one commit:\n{self.listing()}\n\n"
                    f"----- README.md -----\n{self.card}")
        return f"pushed {len(self.files)} files to {self.url} (branch {self.revision}): {self.commit_url}"


def push_to_hub(directory: str | Path, repo_id: str, *, token: str | None = None, **options) -> PushResult:
    """Upload a dlm-adapt checkpoint (or a PEFT adapter of one) in `directory` to the Hub repo `repo_id`.

    Args:
        directory: a checkpoint written by `dlm-adapt convert` / `dlm-adapt train` (OUTPUT/final), or a PEFT
            adapter directory (adapter_config.json) whose base is one. Validated first; never modified.
        repo_id: `namespace/name` (or `name` in your own namespace); created if missing.
        token: a Hub token; default HF_TOKEN, else the token saved by `hf auth login`. Never printed.
        options: the fields of `adapt.config.PushOptions` (private, revision, commit_message, adapter_only,
            dry_run), documented there.

    Returns a `PushResult`; `.report()` is what the CLI prints."""
    o = PushOptions(**options)
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise AdaptError(f"invalid repo id {repo_id!r}: {first_line(e)}") from e
    revision = o.revision or constants.DEFAULT_REVISION
    plan = _plan(Path(directory).expanduser(), o.adapter_only)
    card = build_card(plan, repo_id, revision)
    files = [(path, local.stat().st_size) for path, local in plan.files] + [("README.md", len(card.encode()))]
    files.sort()
    result = PushResult(repo_id, revision, plan.kind, files, card, f"{constants.ENDPOINT}/{repo_id}", o.dry_run)
    if o.dry_run:
        return result
    result.commit_url = _upload(plan, card, repo_id, revision, o.private, o.commit_message, token)
    return result


# ---------------------------------------------------------------- what to upload


def _plan(directory: Path, adapter_only: bool) -> Plan:
    if not directory.exists():
        raise AdaptError(f"{directory} does not exist")
    if not directory.is_dir():
        raise AdaptError(f"{directory} is not a directory; pass a dlm-adapt checkpoint directory")
    found = detect(directory)
    has_config, has_adapter = found.has_config, found.adapter
    if adapter_only and not has_adapter:
        raise AdaptError(f"--adapter-only: {directory} has no adapter_config.json, it is not a PEFT adapter")
    if not has_config and not has_adapter:
        raise AdaptError(f"{directory} is not a dlm-adapt checkpoint: it has no config.json (nor adapter_config.json "
                         "of a PEFT adapter)")
    readme = directory / "README.md"
    _refuse_outside_link(directory, readme)  # its text goes into the uploaded card
    plan = Plan(kind="checkpoint", files=[], checkpoint=None,
                 readme=readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None)
    if has_config and not adapter_only:
        try:
            plan.checkpoint = validate(directory)
        except NotDiffusionError as e:
            if has_adapter:
                raise AdaptError(f"{e} (it also holds a PEFT adapter: push only that with --adapter-only)") from e
            raise
    else:
        plan.kind = "adapter"
        plan.adapter, plan.adapter_parameters, plan.checkpoint = validate_adapter(directory)
    if adapter_only:
        plan.files = [(name, directory / name) for name in ADAPTER_FILES]
        for _, path in plan.files:
            _refuse_outside_link(directory, path)
    else:
        plan.files = _folder_files(directory)
    plan.training, plan.metrics = training_record(directory)
    return plan


def _folder_files(directory: Path) -> list[tuple[str, Path]]:
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        # hidden entries (.git, .cache of huggingface_hub downloads) and bytecode are not part of a checkpoint;
        # the top-level README.md is replaced by the merged card
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or path.suffix == ".pyc":
            continue
        _refuse_outside_link(directory, path)
        if path.is_symlink() and path.is_dir():
            continue  # a link to a folder inside DIR: its files are listed under their own names
        if not path.is_file() or rel.as_posix() == "README.md":
            continue
        files.append((rel.as_posix(), path))
    return files


def _refuse_outside_link(directory: Path, path: Path):
    """A symlink is uploaded as the file it points to: one leaving DIR could publish anything readable here (a
    token, a key), so it is refused rather than skipped (the checkpoint may need that file)."""
    if not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_relative_to(directory.resolve()):
        raise AdaptError(f"{path} is a symbolic link to {target}, outside {directory}; push uploads only files "
                         "inside DIR: replace the link with a copy of the file, or remove it")


# ---------------------------------------------------------------- upload


def _upload(plan: Plan, card: str, repo_id: str, revision: str, private: bool, commit_message: str | None,
            token: str | None) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    if constants.is_offline_mode():
        raise AdaptError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it to push to the Hub")
    origin = "the token passed" if token else "HF_TOKEN" if os.environ.get("HF_TOKEN") else \
        "the token saved by `hf auth login`"
    token = token or get_token()
    if not token:
        raise AdaptError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(token=token)
    message = commit_message or (f"Upload {'PEFT adapter of a ' if plan.kind == 'adapter' else ''}masked diffusion "
                                 "LM with dlm-adapt push")
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision != constants.DEFAULT_REVISION and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        for attempt, delay in enumerate((*COMMIT_RETRY_DELAYS, None)):
            # operations are consumed by a commit attempt, so each attempt gets fresh ones
            operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
                          for path, local in plan.files]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
            try:
                info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
                return info.commit_url
            except Exception as e:
                if delay is None or not _retryable(e):
                    raise
                print(f"dlm-adapt: warning: commit attempt {attempt + 1} failed ({_status(e)}); retrying in "
                      f"{delay:g} s", file=sys.stderr)
                time.sleep(delay)
    except AdaptError:
        raise
    except Exception as e:
        raise _hub_error(e, repo_id, revision, origin, token, constants.ENDPOINT) from None
    raise AssertionError("unreachable")


def _retryable(e: Exception) -> bool:
    response = getattr(e, "response", None)
    if response is not None and getattr(response, "status_code", None) is not None:
        return response.status_code in _RETRY_STATUS
    return _is_transport_error(e)


def _is_transport_error(e: Exception) -> bool:
    # huggingface_hub has used requests, httpx and httpx2 across versions: recognise their transport errors
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        c.__module__.split(".")[0] in ("requests", "httpx", "httpx2", "urllib3") and
        any(w in c.__name__ for w in ("Connect", "Timeout", "Network", "Transport", "Protocol"))
        for c in type(e).__mro__)


def _status(e: Exception) -> str:
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code is not None else type(e).__name__


def _hub_error(e: Exception, repo_id: str, revision: str, origin: str, token: str, endpoint: str) -> AdaptError:
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None) if isinstance(e, HfHubHTTPError) else None
    untouched = "no commit was made and the local files are untouched; run the same command again"
    if code == 401:
        text = (f"the Hub rejected the token (HTTP 401 Unauthorized): {origin} is invalid or expired. No commit was "
                "made and the local files are untouched; set HF_TOKEN or run `hf auth login` with a token that has "
                "write access, then run the same command again")
    elif code == 403:
        text = (f"the token ({origin}) may not write to {repo_id} (HTTP 403 Forbidden). No commit was made and the "
                "local files are untouched; use a token with write access to that namespace, then run the same "
                "command again")
    elif isinstance(e, RevisionNotFoundError):
        text = f"branch {revision} of {repo_id} does not exist and could not be created; {untouched}"
    elif code == 404:
        text = (f"{repo_id} was not found and could not be created (HTTP 404): check the repo id and that the token "
                f"({origin}) may create repos in that namespace; {untouched}")
    elif code is not None:
        detail = getattr(e, "server_message", None) or first_line(e)
        text = f"the Hub answered HTTP {code} ({detail}); {untouched}"
    elif _is_transport_error(e):
        text = f"cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}: {first_line(e)}); {untouched}"
    elif isinstance(e, ValueError) and "README.md" in str(e):
        text = f"the Hub rejected the model card metadata ({first_line(e)}); {untouched}"
    else:
        text = f"upload to {repo_id} failed ({type(e).__name__}: {first_line(e)}); {untouched}"
    return AdaptError(text.replace(token, "***") if token else text)


__all__ = ["PushResult", "push_to_hub"]
