"""The output folder of every job: one rule, applied by :func:`prepare_output_dir`.

Nothing of the user's may be lost, so a job only ever removes or replaces entries that difflora
wrote itself:

* Each job lists the entries it writes at the top of its folder (:class:`Outputs`), in one place.
* Those entries are recorded in ``.difflora-outputs.json`` when the job claims the folder, so a later
  ``--overwrite`` knows they are difflora's. A user's file with a name on the list (their own
  ``README.md``, ``logs/``, ``unet/``...) is never replaced: the job is refused before any work.
* ``--overwrite`` removes the job's own entries (LoRA files, samples, checkpoints...) and keeps every
  other file; it never removes an entry that holds the current directory or an input.
* An unusable folder (a file, not creatable, read-only, on a full disk) is refused before any
  model is loaded, not after the work.
* Training jobs lock the folder (``.difflora.lock``, ``flock`` plus the pid for the message), so a
  second trainer on the same folder is refused; the kernel drops the lock of a killed process.
* Leftovers of a killed run (temporary files of dead processes, half-written checkpoints, a
  checkpoint beyond ``checkpoints_total_limit``) are cleaned when the next run starts there.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from difflora.errors import UserError

RECORD_NAME = ".difflora-outputs.json"
LOCK_NAME = ".difflora.lock"
_INTERNAL = {RECORD_NAME, LOCK_NAME}
MIN_FREE_BYTES = 32 * 2**20  # below this a job cannot even write its first checkpoint or image

# ``.NAME.tmp-PID[.ext]`` (written by process PID) or ``.NAME.tmp[.ext]``: renamed into place when complete.
_TEMP = re.compile(r"^\.(?P<base>.+?)\.tmp(?:-(?P<pid>\d+))?(?P<ext>\.[A-Za-z0-9]+)?$")
_OLD_CHECKPOINT = re.compile(r"^\.(checkpoint-\d+)\.old$")
_OWN_TEMPS = {"difflora-probe", "fuse-staging"}  # temporary names that are not an output's
CHECKPOINT_PATTERN = r"checkpoint-\d+"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Outputs:
    """What one job writes at the top of its output folder: the only entries it may remove or replace.

    ``names`` are exact entry names, ``patterns`` regular expressions for numbered ones
    (``checkpoint-12``). ``marker`` is the entry whose presence means a finished run is there.
    ``recognise`` tells whether a folder without a record was written by this job (folders from
    before records, or jobs that keep no record). ``record`` is False for jobs whose own files
    already say what they wrote (a sample manifest).
    """

    job: str
    names: tuple[str, ...]
    patterns: tuple[str, ...] = ()
    marker: str | None = None
    recognise: Callable[[Path], bool] | None = None
    record: bool = True

    def with_names(self, *extra: str) -> Outputs:
        """The same job writing more entries (e.g. a logging folder only some runs use)."""
        return replace(self, names=self.names + tuple(n for n in extra if n not in self.names))

    def matches(self, name: str) -> bool:
        return name in self.names or any(re.fullmatch(p, name) for p in self.patterns)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: str | Path, outputs: Outputs, *, overwrite: bool, resuming: bool = False,
                       inputs: Iterable[str | Path | None] = (), lock: bool = False, clear: bool = True,
                       empty_unless_overwrite: bool = False, checkpoints_total_limit: int | None = None,
                       keep: Path | None = None, need_bytes: int = MIN_FREE_BYTES, what: str = "output_dir") -> Path:
    """Check, create, lock and clear ``output_dir`` for one job; every refusal happens here, before work.

    ``overwrite`` removes the job's earlier outputs (unless ``resuming``: the run continues); with
    ``clear=False`` the job replaces them itself when its new outputs are complete. ``inputs`` are
    paths the job reads: none of them is ever removed, and none may be the folder itself. ``empty_unless_overwrite`` is for jobs that write a whole model into a folder of its own.
    ``keep`` is a checkpoint that must survive pruning (the one being resumed); ``what`` names the
    folder's flag in messages.
    """
    out = Path(output_dir)
    read = _input_paths(inputs)
    _check_not_an_input(out, read, what)
    _create(out, what)
    main = _is_main_process()
    if lock and main:
        _lock(out)  # first, so a folder in use is reported as such and nothing is removed under its owner
    try:
        doomed = _check(out, outputs, overwrite=overwrite, resuming=resuming, read=read,
                        empty_unless_overwrite=empty_unless_overwrite, what=what)
        _check_space(out, need_bytes, what)
        if main:  # the main process cleans and records; the others of a launch only check
            _clean_orphans(out, outputs, locked=lock, checkpoints_total_limit=checkpoints_total_limit, keep=keep)
            if clear:
                for path in doomed:
                    remove_entry(path)
            if outputs.record:
                _claim(out, outputs, _read_record(out))
    except BaseException:
        if lock and main:
            release_output_dir(out)
        raise
    return out


def _check(out: Path, outputs: Outputs, *, overwrite: bool, resuming: bool, read: list[Path],
           empty_unless_overwrite: bool, what: str) -> list[Path]:
    """Every refusal of the rule; returns the entries ``--overwrite`` removes."""
    ours = _difflora_entries(out, outputs, _read_record(out))
    entries = {p.name: p for p in out.iterdir() if p.name not in _INTERNAL and not _TEMP.match(p.name)}
    if outputs.marker and outputs.marker in entries and not (overwrite or resuming):
        raise UserError(f"{what} '{out}' already holds a finished run; pass --overwrite to replace it, "
                        "--resume_from_checkpoint latest to continue it, or choose another folder")
    foreign = sorted(n for n in entries if n in outputs.names and n not in ours)
    if foreign:
        listed = ", ".join(f"'{n}'" for n in foreign[:3])
        raise UserError(f"{what} '{out}' holds {listed}, which difflora did not write and this job would "
                        f"replace; move it away or choose another {what}")
    if empty_unless_overwrite and entries and not overwrite:
        raise UserError(f"'{out}' is not empty; choose another {what} or pass --overwrite")
    if not (overwrite or resuming) and outputs.marker and CHECKPOINT_PATTERN in outputs.patterns:
        started = _checkpoints(out)
        if started:
            raise UserError(f"{what} '{out}' holds '{started[-1].name}' of an unfinished run; pass "
                            "--resume_from_checkpoint latest to continue it, --overwrite to start over, "
                            "or choose another folder")
    if resuming or not overwrite:
        return []
    doomed = [entries[n] for n in sorted(entries) if n in ours and outputs.matches(n)]
    check_removable(doomed, read)
    return doomed


def owned_entries(output_dir: str | Path, outputs: Outputs) -> list[Path]:
    """The job's entries in ``output_dir`` that difflora wrote (what ``--overwrite`` replaces)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    ours = _difflora_entries(out, outputs, _read_record(out))
    return sorted(p for p in out.iterdir() if p.name in ours and outputs.matches(p.name))


def check_removable(paths: Iterable[Path], inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse to remove an entry that is or holds the current directory or an input."""
    cwd = Path.cwd().resolve()
    read = _input_paths(inputs)
    for path in paths:
        target = _absolute(path)
        if target == cwd or target in cwd.parents:
            raise UserError(f"'{path}' holds the current directory and --overwrite would remove it; run from "
                            "another folder or choose another output_dir")
        for item in read:
            if target == item or target in item.parents:
                raise UserError(f"'{path}' is or holds the input '{item}' and --overwrite would remove it; "
                                "choose another output_dir")


def remove_entry(path: Path) -> None:
    """Remove one file or folder; a symbolic link is removed, never what it points to."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass  # another process of the same run removed it first


# ---------------------------------------------------------------------------------------------
# Locking
# ---------------------------------------------------------------------------------------------

_HELD: dict[Path, int] = {}
_CREATED: set[Path] = set()  # folders this process created; removed again if the job fails before using them


def _lock(out: Path) -> None:
    """Take ``out/.difflora.lock``; refuse when a live process holds it."""
    import fcntl

    key = out.resolve()
    if key in _HELD:
        raise UserError(f"output_dir '{out}' is in use by process {os.getpid()} (this one); "
                        "choose another output_dir")
    path = key / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write into output_dir '{out}' ({err.strerror}); choose a writable folder") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise UserError(f"output_dir '{out}' is in use by process {holder or 'unknown'}; wait for it to "
                            "finish, stop it, or choose another output_dir") from None
        except OSError:  # a file system without flock: fall back to the pid written in the file
            holder = _read_pid(fd)
            if holder and holder != os.getpid() and _alive(holder):
                os.close(fd)
                raise UserError(f"output_dir '{out}' is in use by process {holder}; wait for it to finish, "
                                "stop it, or choose another output_dir") from None
        # The previous holder may have removed the file between our open and flock: lock what is there now.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = fd
        return


def release_output_dir(output_dir: str | Path) -> None:
    """Drop this process's lock on ``output_dir`` (a no-op if it holds none)."""
    key = Path(output_dir).resolve()
    fd = _HELD.pop(key, None)
    if fd is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(key / LOCK_NAME)  # while still holding it, so no one else's lock file is removed
    os.close(fd)


def output_job(fn: F) -> F:
    """Decorate a job: the output folders it locks are released when it returns or raises, and a folder
    it created is removed again when it fails before writing anything there (a refusal leaves no trace)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        held, created = set(_HELD), set(_CREATED)
        failed = True
        try:
            result = fn(*args, **kwargs)
            failed = False
            return result
        finally:
            for key in set(_HELD) - held:
                release_output_dir(key)
            for key in set(_CREATED) - created:
                _CREATED.discard(key)
                if failed:
                    _remove_if_unused(key)

    return wrapper  # type: ignore[return-value]


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release_output_dir(key)


def _remove_if_unused(folder: Path) -> None:
    try:
        if all(p.name in _INTERNAL for p in folder.iterdir()):
            for name in _INTERNAL:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
            folder.rmdir()
    except OSError:
        pass


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Orphans of killed runs
# ---------------------------------------------------------------------------------------------


def _clean_orphans(out: Path, outputs: Outputs, locked: bool, checkpoints_total_limit: int | None,
                   keep: Path | None) -> None:
    """Remove what a killed run left behind.

    A temporary file of a job output is removed when the process named in it is dead; one without a
    pid, a half-replaced checkpoint and checkpoints beyond the limit only by the lock holder (no other
    trainer can be writing there). Anything else, a user's ``.notes.tmp`` included, is left alone.
    """
    for path in list(out.iterdir()):
        name = path.name
        old = _OLD_CHECKPOINT.match(name)
        if old and locked:  # killed while replacing a checkpoint of the same step: keep the complete one
            final = out / old.group(1)
            if not final.exists() and (path / "state.json").is_file():
                os.replace(path, final)
            else:
                remove_entry(path)
            continue
        m = _TEMP.match(name)
        if not m or not _is_output_temp(m, outputs):
            continue
        pid = m.group("pid")
        if (pid is not None and not _alive(int(pid))) or (pid is None and locked):
            remove_entry(path)
    if locked and checkpoints_total_limit is not None and checkpoints_total_limit > 0:
        keep_abs = _absolute(keep) if keep is not None else None
        for stale in _checkpoints(out)[:-checkpoints_total_limit]:
            if _absolute(stale) != keep_abs:
                remove_entry(stale)


def _is_output_temp(m: re.Match[str], outputs: Outputs) -> bool:
    base, ext = m.group("base"), m.group("ext") or ""
    return any(outputs.matches(n) or n in _INTERNAL for n in (base, base + ext)) or base in _OWN_TEMPS


def _checkpoints(out: Path) -> list[Path]:
    from difflora.train.checkpoint import list_checkpoints

    return list_checkpoints(out)


# ---------------------------------------------------------------------------------------------
# The record of what difflora wrote
# ---------------------------------------------------------------------------------------------


def _read_record(out: Path) -> dict[str, list[str]]:
    try:
        data = json.loads((out / RECORD_NAME).read_text(encoding="utf-8"))
        jobs = data["jobs"]
        return {str(job): [str(n) for n in names] for job, names in jobs.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _difflora_entries(out: Path, outputs: Outputs, record: dict[str, list[str]]) -> set[str]:
    """Names in ``out`` that difflora wrote: recorded by any job, or recognisably this job's."""
    ours = {n for names in record.values() for n in names}
    existing = [p.name for p in out.iterdir()] if out.is_dir() else []
    if outputs.job in record or (outputs.recognise is not None and outputs.recognise(out)):
        ours |= {n for n in existing if outputs.matches(n)}
    return ours


def claim_outputs(output_dir: str | Path, outputs: Outputs) -> None:
    """Record ``outputs.names`` in ``output_dir`` as difflora's (for entries known only after the work)."""
    out = Path(output_dir)
    _claim(out, outputs, _read_record(out))


def _claim(out: Path, outputs: Outputs, record: dict[str, list[str]]) -> None:
    record = dict(record)
    record[outputs.job] = sorted(set(record.get(outputs.job, [])) | set(outputs.names))
    atomic_write_text(out / RECORD_NAME, json.dumps({"jobs": record}, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _input_paths(inputs: Iterable[str | Path | None]) -> list[Path]:
    """Local inputs as absolute paths (hub ids and missing paths are not local files)."""
    found = []
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = Path(item)
        if path.exists():
            found.append(path.resolve())
    return found


def _absolute(path: Path) -> Path:
    """Absolute path with the folders resolved but not a final symbolic link (it is what gets removed)."""
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / path.name if path.name else path.resolve()


def _check_not_an_input(out: Path, inputs: list[Path], what: str) -> None:
    """The outputs would mix with what the job reads (a loss curve among the training images, a
    fused model over its base model)."""
    target = Path(os.path.abspath(out)).resolve()
    for item in inputs:
        if target == item:
            raise UserError(f"{what} '{out}' is the input folder '{item}'; choose another {what}")


def _create(out: Path, what: str) -> None:
    """Create ``out`` and prove it writable, or refuse in one line."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} '{out}' is a file; choose a folder path")
    try:
        if not out.exists():
            out.mkdir(parents=True)
            _CREATED.add(out.resolve())
    except FileExistsError:
        # Another process (a DDP rank started at the same moment) made it between the check and
        # mkdir: that is the folder we wanted. Only a file in the way is an error.
        if not out.is_dir():
            raise UserError(f"cannot create {what} '{out}': part of the path is a file; choose a folder path") \
                from None
    except OSError as err:
        raise UserError(f"cannot create {what} '{out}' ({err.strerror}); choose a writable folder") from None
    probe = out / f".difflora-probe.tmp-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        why = "read-only" if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else err.strerror
        raise UserError(f"cannot write into {what} '{out}' ({why}); choose a writable folder") from None


def _check_space(out: Path, need_bytes: int, what: str) -> None:
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return
    if free < need_bytes:
        raise UserError(f"only {free / 2**20:.0f} MiB free on the disk of {what} '{out}', this job needs "
                        f"at least {need_bytes / 2**20:.0f} MiB; free some space or choose another folder")


def _is_main_process() -> bool:
    """Rank 0 of a launcher (torchrun / accelerate set RANK) or a plain process."""
    return os.environ.get("RANK", "0") in ("", "0")


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def temp_path(path: Path) -> Path:
    """A hidden temporary name beside ``path`` that names this process (so orphans can be told apart)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it over ``path``: a killed run
    never leaves half a file, and a failed write leaves no temporary behind. The temporary keeps
    ``path``'s suffix, so writers that pick a format from it (PIL, matplotlib) still do."""
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_image(image: Any, path: Path) -> None:
    """:func:`atomic_write` of a PIL image."""
    atomic_write(path, image.save)


def atomic_save_safetensors(path: Path, tensors: Mapping[str, Any],
                            metadata: Mapping[str, str] | None = None) -> None:
    """:func:`atomic_write` of a safetensors file (tensors copied to contiguous CPU memory first)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=dict(metadata) if metadata else None))


# ---------------------------------------------------------------------------------------------
# Recognising folders written before records existed
# ---------------------------------------------------------------------------------------------


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header alone ({} if unreadable)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 2**26:
                return {}
            meta = json.loads(f.read(size)).get("__metadata__") or {}
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


__all__ = ["CHECKPOINT_PATTERN", "LOCK_NAME", "MIN_FREE_BYTES", "RECORD_NAME", "Outputs", "atomic_save_image",
           "atomic_save_safetensors", "atomic_write_text", "check_removable", "claim_outputs", "owned_entries",
           "prepare_output_dir", "release_output_dir", "output_job", "remove_entry", "safetensors_metadata",
           "temp_path"]
