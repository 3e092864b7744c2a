"""Outputs that appear whole or not at all.

Every stage writes into a temporary sibling of its output and renames it into place when complete,
so a stage killed midway leaves the previous output or none, never a half-written model or metrics file.
The temporary siblings carry their writer's process id: what a killed run left behind is removed by the
next write of the same output (and .gitignore keeps it out of git meanwhile).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import PipelineError

# mkdtemp/mkstemp create private (0700/0600) entries, and so do libraries that write through a temporary
# file (safetensors' weights): outputs get the usual permissions under the umask.
_UMASK = os.umask(0)
os.umask(_UMASK)
_DIR_MODE = 0o777 & ~_UMASK
_FILE_MODE = 0o666 & ~_UMASK


def refuse_links(*paths: str | Path) -> None:
    """Stop with one line if an output is a symbolic link. A stage replaces its outputs whole, by rename: it
    would replace the link and leave its target as it was, so it refuses before any work instead."""
    for path in map(Path, paths):
        if path.is_symlink():
            raise PipelineError(
                f"{path}: the output is a symbolic link (to {os.readlink(path)}), which a stage does not replace: "
                "put the files themselves in its place (to save disk space, let DVC link them from its cache: "
                "dvc config cache.type hardlink,symlink)"
            )


def _may_be_writing(pid: int) -> bool:
    """Whether process `pid` may still be writing a copy: not if it is gone, nor if it is this process (which
    is only starting to write this output: the copy is a killed run's that had the same pid, as a restarted
    container hands out the same pids again)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def _remove_stale(path: Path) -> None:
    """Remove the temporary and replaced copies of `path` that a killed writer left (named after its pid)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)(?:-.*)?")
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        found = pattern.fullmatch(leftover.name)
        if found and not _may_be_writing(int(found[1])):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()


def _prepare(path: Path) -> None:
    """What every write of an output starts with: a link refused, the leftovers of killed writers removed."""
    refuse_links(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)


def _usual_modes(top: Path) -> None:
    """Every folder and file under `top` with the mode the umask gives new ones."""
    os.chmod(top, _DIR_MODE)
    for folder, dirs, files in os.walk(top):
        for name, mode in [(d, _DIR_MODE) for d in dirs] + [(f, _FILE_MODE) for f in files]:
            entry = os.path.join(folder, name)
            if not os.path.islink(entry):
                os.chmod(entry, mode)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `path` when the block completes without error."""
    path = Path(path)
    _prepare(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        _usual_modes(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def discarded_dir() -> Iterator[Path]:
    """A temporary directory removed afterwards: where a process that must not write outputs (any but the
    first of a distributed run) writes what the code writes."""
    with tempfile.TemporaryDirectory(prefix="qlora-discarded-") as tmp:
        yield Path(tmp)


def write_texts(files: Mapping[str | Path, str]) -> None:
    """Write files that belong together (a stage's reports and metrics) so that they replace the old ones
    together: each is written whole to a temporary sibling and synced, and only when all are written are they
    renamed into place. An error or a full disk on the way leaves every old file as it was; only a kill in
    the microseconds between two renames can leave some old and some new."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            path = Path(path)
            _prepare(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
            staged.append((tmp, path))
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically (temporary file, fsync, rename)."""
    write_texts({path: text})


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json_text(data))


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    write_text(path, jsonl_text(rows))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
