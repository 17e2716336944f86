"""Writing files and folders without ever losing what was there before: the one home of two rules that every
command writing to disk follows.

- **Atomic writes.** A file is written next to its target and renamed over it (`atomic_write_text`,
  `atomic_write_bytes`), and a folder is built in a staging sibling and moved in (`atomic_output_dir`), so a
  crash or a full disk never leaves half a file where a reader will look.
- **Output-folder ownership.** A command writes only into a folder that is new, empty, or carries the marker
  file (`.spannorm-output.json`) that the same command wrote there for the same kind of output. Anything else
  is refused before any work starts, with an error naming the folder and the option that overrides it
  (`--overwrite`); even then only the files the command itself writes are replaced, and nothing else in the
  folder is touched.
- **One writer at a time.** A command holds an exclusive lock on its output folder for its whole life, filelock's
  OS-level lock, which dies with its process, so a killed command never blocks the next one. A second command into
  the same folder is refused, naming the holder, before it changes anything there. A training run, which writes
  into its folder as it goes, locks `.spannorm-lock` inside it (`locked_output_dir`); a folder that is built in a
  staging sibling and moved in (`atomic_output_dir`: an adapter, a merged model, a Hub folder) is locked beside it,
  `.NAME.spannorm-lock` (`output_lock`), as the folder may not exist yet and is replaced whole by a rename, and that
  lock is removed when released, so nothing of it is left in the folder or beside it. A command that fails while
  setting up removes what it added (`remove_additions_on_failure`), so a failed start never leaves a folder that
  refuses the rerun.
- **Writable before work.** A place the command cannot write to (a read-only folder) is refused before any work
  too (`check_writable`), not after hours of it.

A full disk is named (`DiskFullError`: "no space left on device while writing X") rather than surfacing as
whatever the failing library says (`RuntimeError: basic_ios::clear`, a safetensors `IoError`).
"""

import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

OUTPUT_MARKER = ".spannorm-output.json"
# The lock a command holds on its output folder, and who holds it (written after acquiring): bookkeeping, never
# counted as the folder's content.
LOCK_FILE = ".spannorm-lock"
LOCK_HOLDER_FILE = ".spannorm-lock.json"
LOCK_FILES = (LOCK_FILE, LOCK_HOLDER_FILE)
# Kinds of output folder -> what writes them (for error messages).
OUTPUT_KINDS = {
    "training-run": "a training run (scripts/train.py --output)",
    "hub-folder": "a Hub folder (scripts/publish.py --output-dir)",
    "lora-adapter": "a LoRA adapter (scripts/finetune_lora.py --output)",
    "merged-model": "a merged model (scripts/finetune_lora.py --merge)",
}


class OutputDirError(FileExistsError):
    """An output folder the command may not write into; the message says why and which option overrides it."""


class OutputBusyError(OutputDirError):
    """Another process holds the output folder's lock; the message names it (pid, host, start time)."""


class DiskFullError(OSError):
    """No space left on the device while writing a named file."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        super().__init__(errno.ENOSPC, f"no space left on device while writing {self.path}")

    def __str__(self) -> str:
        return f"no space left on device while writing {self.path} (free some space, then run again)"


# ------------------------------------------------------------------------------------------------------ disk full


def is_disk_full(error: BaseException) -> bool:
    """True for out-of-space failures, however the writing library reports them (OSError ENOSPC/EDQUOT, torch's
    `basic_ios::clear` / `PytorchStreamWriter failed writing`, safetensors' `StorageFull` IoError)."""
    if isinstance(error, DiskFullError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "StorageFull", "os error 28", "QuotaExceeded"))


@contextmanager
def naming_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an out-of-space failure inside the block as `DiskFullError(path)`; other errors pass through.
    Torch reports a full disk as `basic_ios::clear` or a stream-writer failure without the errno, so for those the
    free space of `path`'s device decides."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if is_disk_full(error) or (_vague_write_error(error) and _device_nearly_full(path)):
            raise DiskFullError(path) from error
        raise


def _vague_write_error(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, (RuntimeError, OSError)) and ("basic_ios" in text or "failed writing" in text)


def _device_nearly_full(path: str | os.PathLike, margin: int = 1 << 20) -> bool:
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


# -------------------------------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, and rename, so readers never see half a file."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with naming_disk_full(path), open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    """`atomic_write_text` of indented JSON with a final newline."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- output folders


def _read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object of one of this module's records (a marker, a lock's holder), read as every settings file is
    (`cli.read_json_object`: in blocks, bounded); None when it is missing or unreadable."""
    from .cli import read_json_object  # cli builds on this module

    try:
        return read_json_object(path, what="record")
    except (OSError, ValueError):
        return None


def read_output_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ownership marker of `folder`, or None when it has none (or an unreadable one: then it is not ours)."""
    marker = _read_record(Path(folder) / OUTPUT_MARKER)
    return marker if marker is not None and marker.get("kind") in OUTPUT_KINDS else None


def check_output_dir(path: str | os.PathLike, kind: str, *, flag: str, overwrite: bool = False) -> Path:
    """Refuse (OutputDirError) an output folder that is neither new, nor empty, nor marked as `kind` by an
    earlier run of the same command, unless `overwrite`. Writes nothing: call it before any work."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(path).expanduser()
    if not path.exists():
        return path
    if not path.is_dir():
        raise OutputDirError(f"{flag} {str(path)!r} exists and is not a folder: choose a folder path")
    entries = sorted(entry.name for entry in path.iterdir() if entry.name not in LOCK_FILES)
    marker = read_output_marker(path)
    if not entries or (marker is not None and marker["kind"] == kind) or overwrite:
        return path
    if marker is not None:
        what = f"holds {OUTPUT_KINDS[marker['kind']]}"
    else:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        what = f"is not empty ({shown}) and was not created by this command"
    raise OutputDirError(
        f"{flag} {str(path)!r} {what}: refusing to write {OUTPUT_KINDS[kind].split(' (')[0]} into it; choose a new "
        f"folder, or pass --overwrite to replace only the files this command writes"
    )


def check_output_file(path: str | os.PathLike, *, flag: str, overwrite: bool = False) -> Path:
    """Refuse (OutputDirError) an output file that already exists, unless `overwrite`: a file the user names as
    output may be anything of theirs. Writes nothing: call it before any work."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputDirError(f"{flag} {str(path)!r} is a folder: name a file")
    if path.exists() and not overwrite:
        raise OutputDirError(
            f"{flag} {str(path)!r} already exists: refusing to replace it; choose a new file name, or pass "
            "--overwrite to replace it"
        )
    return path


def check_writable(path: str | os.PathLike, *, flag: str) -> None:
    """Raise PermissionError, naming `flag`, unless this process can write `path` the way `atomic_output_dir` and
    `atomic_write_bytes` do, through a staging sibling: the nearest existing folder above `path`, and `path` itself
    when it is a folder, must take a new entry. Tried for real (a temporary folder made and removed), because
    permission bits say nothing of read-only mounts, ACLs or root. Call it before any work."""
    path = Path(path).expanduser().absolute()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    for folder in [parent, path] if path.is_dir() else [parent]:
        try:
            tempfile.TemporaryDirectory(dir=folder, prefix=".write-test-").cleanup()
        except OSError as error:
            raise PermissionError(
                f"{flag} {str(path)!r} cannot be written: {str(folder)!r} takes no new files "
                f"({error.strerror or error}); choose a folder you can write to"
            ) from None


def claim_output_dir(path: str | os.PathLike, kind: str, *, flag: str, overwrite: bool = False) -> Path:
    """`check_output_dir`, then create the folder and mark it as `kind` (keeping the file list of an earlier
    output of the same kind). Returns the folder."""
    path = check_output_dir(path, kind, flag=flag, overwrite=overwrite)
    path.mkdir(parents=True, exist_ok=True)
    marker = read_output_marker(path)
    if marker is None or marker["kind"] != kind:
        write_output_marker(path, kind, files=[])
    return path


def write_output_marker(folder: Path, kind: str, files: list[str]) -> None:
    atomic_write_json(folder / OUTPUT_MARKER, {"kind": kind, "written_by": OUTPUT_KINDS[kind], "files": files})


def _relative_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


@contextmanager
def atomic_output_dir(
    target: str | os.PathLike, kind: str, *, flag: str = "output folder", overwrite: bool = False
) -> Iterator[Path]:
    """Yield a staging sibling of `target`; if the body succeeds, move its files into `target`.

    `target` must pass `check_output_dir` (new, empty, marked as `kind`, or `overwrite`). A new or empty target
    is replaced by the staging folder in one rename. Otherwise the staged files are moved in one by one
    (config.json last, so a loader never sees a config before its weights), files that an earlier output of
    the same kind wrote and this one did not are removed, and every other file in the folder is left alone.
    On failure nothing in `target` changes. The folder's lock (`output_lock`) is held throughout; a command that
    holds it already (from its start) holds it on."""
    target = check_output_dir(target, kind, flag=flag, overwrite=overwrite).resolve()
    with output_lock(target, flag=flag):
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            yield staging
            _move_in(staging, target, kind, flag=flag, overwrite=overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _move_in(staging: Path, target: Path, kind: str, *, flag: str, overwrite: bool) -> None:
    """The end of `atomic_output_dir`: the staged files into `target`, and the marker listing them."""
    check_output_dir(target, kind, flag=flag, overwrite=overwrite)  # nothing else wrote there meanwhile
    files = [name for name in _relative_files(staging) if name != OUTPUT_MARKER]
    if not target.exists() or not any(target.iterdir()):
        write_output_marker(staging, kind, files)
        if target.exists():
            target.rmdir()
        staging.rename(target)
        return
    previous = read_output_marker(target)
    for name in sorted(files, key=lambda name: name == "config.json"):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target / name)
    if previous is not None and previous["kind"] == kind:
        for stale in _listed_files(target, previous) - set(files):
            (target / stale).unlink(missing_ok=True)
    write_output_marker(target, kind, files)


def _listed_files(folder: Path, marker: dict[str, Any]) -> set[str]:
    """The files `marker` says an earlier output wrote in `folder`, those that are inside it: a marker comes with
    the folder, and one listing an absolute path, `..` or a path through a link to elsewhere must not make a
    command remove a file outside it."""
    listed = marker.get("files")
    names = [name for name in listed if isinstance(name, str)] if isinstance(listed, list) else []
    return {name for name in names if folder in (folder / name).resolve().parents}


# ---------------------------------------------------------------------------------------------------------- locks


def _lock_holder(record: Path) -> str:
    """Who holds a lock, as its holder recorded it in `record`."""
    holder = _read_record(record) or {}
    if not all(key in holder for key in ("pid", "host", "started")):
        return "another process (one that has not recorded itself yet)"
    return f"pid {holder['pid']} on {holder['host']} (started {holder['started']})"


@contextmanager
def _holding(lock: FileLock, record: Path, *, flag: str, path: Path, discard: bool = False) -> Iterator[None]:
    """Hold `lock` for the block, or raise `OutputBusyError` naming the holder of the output `path` (one attempt: a
    busy folder is an error, not a wait). The outermost hold writes who holds it (pid, host, start time, command)
    to `record`, and removes that again while still holding the lock, so a stale record names nobody; with
    `discard`, the lock file too (filelock never takes a lock file that was removed, its link count is 0)."""
    try:
        lock.acquire()
    except Timeout:  # before OSError: filelock's Timeout is a TimeoutError
        raise _busy_error(path, record, flag) from None
    except OSError as error:
        raise OutputDirError(f"{flag} {str(path)!r} is not writable: {error}") from error
    outermost = lock.lock_counter == 1
    try:
        if outermost:
            started = datetime.now().astimezone().isoformat(timespec="seconds")
            command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command}
            with naming_disk_full(record):  # in place: a temporary file would look like content
                record.write_text(json.dumps(holder))
        yield
    finally:
        if outermost:
            record.unlink(missing_ok=True)
            if discard:
                Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()


def _busy_error(path: Path, record: Path, flag: str) -> OutputBusyError:
    """The output `path` is held by the process that `record` names."""
    return OutputBusyError(
        f"{flag} {str(path)!r} is in use by {_lock_holder(record)}: wait for it to end, or choose another folder"
    )


def raise_if_busy(path: str | os.PathLike, *, flag: str) -> None:
    """Raise `OutputBusyError` if a process holds the lock of the output folder `path`; creates nothing (a folder
    without the lock file has no holder). For a folder about to be refused as not this command's: a run starting
    there takes the lock before it marks the folder as its own, so for that moment "in use" is the true reason."""
    lock_file = Path(path).expanduser() / LOCK_FILE
    if not lock_file.is_file():
        return
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise _busy_error(lock_file.parent, lock_file.parent / LOCK_HOLDER_FILE, flag) from None
    except OSError:
        return  # unreadable: the refusal that follows stands
    lock.release()


@contextmanager
def locked_output_dir(path: str | os.PathLike, *, flag: str) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder `path` (created if missing) for the block, or raise
    `OutputBusyError` naming the process that holds it: `.spannorm-lock` inside it, for a command that writes into
    the folder as it goes (a training run). The lock is filelock's OS-level one (flock on POSIX): the system
    releases it when its process dies, so a killed run's lock never blocks the next run."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"{flag} {str(path)!r} is not writable: {error}") from error
    with _holding(FileLock(path / LOCK_FILE, timeout=0), path / LOCK_HOLDER_FILE, flag=flag, path=path):
        yield path


@contextmanager
def output_lock(path: str | os.PathLike, *, flag: str) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder `path` for the block, or raise `OutputBusyError` naming the
    process that holds it: `.NAME.spannorm-lock` beside the folder, for a folder that is built in a staging
    sibling and moved in (`atomic_output_dir`), which may not exist yet and is replaced whole by a rename. A
    command takes it at its start and holds it to its end; it is reentrant in the thread that holds it (so
    `atomic_output_dir` holds it on), and another thread or process is refused. When the outermost hold ends the
    lock file and its holder's record are removed, and so are folders above `path` created for them and left
    empty: nothing of the lock stays beside the folder. Returns the resolved path."""
    shown, path = Path(path).expanduser(), Path(path).expanduser().resolve()  # errors name the folder as given
    made = [folder for folder in path.parents if not folder.exists()]  # nearest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"{flag} {str(shown)!r} is not writable: {error}") from error
    try:
        lock = FileLock(path.with_name(f".{path.name}{LOCK_FILE}"), timeout=0, is_singleton=True)
        record = path.with_name(f".{path.name}{LOCK_HOLDER_FILE}")
        with _holding(lock, record, flag=flag, path=shown, discard=True):
            yield path
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty: the output is in it (or something else now is)
                break


def hold_outputs(outputs: Sequence[tuple[str | os.PathLike, str, str]], *, overwrite: bool = False) -> ExitStack:
    """What a command does with its output folders before any work: check each (`(path, kind, flag)`:
    `check_output_dir`, `check_writable`) and take its lock (`output_lock`), which the returned stack holds until it
    is closed (`with hold_outputs(...):` around the command's work). Writes nothing into the folders."""
    stack = ExitStack()
    with stack:  # a refused folder releases the locks already taken
        for path, kind, flag in outputs:
            check_output_dir(path, kind, flag=flag, overwrite=overwrite)
            check_writable(path, flag=flag)
            stack.enter_context(output_lock(path, flag=flag))
        return stack.pop_all()


@contextmanager
def remove_additions_on_failure(folder: str | os.PathLike) -> Iterator[None]:
    """If the block raises, remove what it added to `folder` (its top-level entries that were not there before;
    the lock and the ownership marker stay), so a command that fails while setting up leaves no files that would
    make its rerun look like a write over an earlier output."""
    folder = Path(folder)
    before = set(os.listdir(folder))
    try:
        yield
    except BaseException:
        for name in sorted(set(os.listdir(folder)) - before - {OUTPUT_MARKER, *LOCK_FILES}):
            entry = folder / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        raise
