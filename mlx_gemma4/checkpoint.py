"""Checkpoint files: a local folder or a Hub repo id -> folder, config.json, safetensors."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import ConfigError, ModelNotFoundError, WeightsError
from .files import access_error

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_REPO_ID = re.compile(r"^[\w-][\w.-]*/[\w.-]+$")
# "Pass a local folder" works from Python and from the CLI alike
LOCAL_FOLDER_HINT = "pass a local folder (--model PATH in the CLI)"


def looks_like_a_path(name: str) -> bool:
    """`./x`, `../x`, `/x`, `~/x`, `x/y/z`, `x/`, `x\\y`: a folder, never a Hub repo id."""
    return (
        name.startswith((".", "/", "~"))
        or name.endswith("/")
        or "\\" in name
        or name.count("/") > 1
    )


def resolve_model_path(
    path_or_repo: str | os.PathLike,
    revision: str | None = None,
    patterns: list[str] = HUB_PATTERNS,
) -> Path:
    """A local folder as given, or a Hub repo id downloaded (or found in the HF cache): the
    files matching `patterns` (all a checkpoint needs, by default)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; pass the checkpoint's folder instead")
        if not os.access(path, os.R_OK | os.X_OK):
            raise access_error(path, "read", PermissionError(13, "permission denied"))
        return path
    name = str(path_or_repo)
    if isinstance(path_or_repo, os.PathLike) or looks_like_a_path(name):
        raise ModelNotFoundError(f"{name}: no such folder")
    if not _REPO_ID.match(name):
        raise ModelNotFoundError(
            f"{name}: no such folder, and not a Hub repo id of the form owner/name"
        )
    return _download(name, revision, patterns)


def _download(repo_id: str, revision: str | None, patterns: list[str] = HUB_PATTERNS) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id}: revision {revision!r} not found on the Hub") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id}: no such repo on the Hub (or it is private: log in with `hf auth login`)"
        ) from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub is unreachable"
        raise ModelNotFoundError(
            f"{repo_id} is not in the Hugging Face cache and {why}; download it where the Hub "
            f"is reachable, or {LOCAL_FOLDER_HINT}"
        ) from e
    except OSError as e:
        raise ModelNotFoundError(f"{repo_id}: download failed ({e}); {LOCAL_FOLDER_HINT}") from e
    return Path(folder)


def read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise ConfigError(f"{file}: missing; a checkpoint folder needs its config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    except OSError as e:
        raise access_error(file, "read", e) from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object at the top level")
    return raw


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: unreadable shard index ({e})") from e
        except OSError as e:
            raise access_error(index, "read", e) from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(
                f"{index} lists shards that are missing: {', '.join(missing)}; "
                "download the whole checkpoint again"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no .safetensors files; is this a Gemma 4 checkpoint?")
    return files


def check_safetensors(file: Path) -> None:
    """Fail with a clear message on an unreadable, truncated or corrupt file, before MLX
    reads it."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{file}: truncated ({size} bytes); download it again")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise WeightsError(
                    f"{file}: truncated or not a safetensors file; download it again"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WeightsError(f"{file}: corrupt safetensors header; download it again") from e
    except OSError as e:
        raise access_error(file, "read", e) from e
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise WeightsError(f"{file}: truncated ({size} of {expected} bytes); download it again")


def read_weights(files: list[Path]) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """Every tensor of the checkpoint, and the file each came from."""
    weights: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for file in files:
        check_safetensors(file)
        try:
            tensors = mx.load(str(file))
        except Exception as e:  # MLX reports parse failures as bare runtime errors
            raise WeightsError(f"{file}: could not be read ({e})") from e
        weights.update(tensors)
        origin.update(dict.fromkeys(tensors, file))
    return weights, origin
