"""The run folder (--out): one run at a time, healed after a kill, a metrics log that survives one.

- `locked_run_folder(out)` holds an exclusive lock on `out/.mtbert.lock` for the whole run.
  The lock is an `fcntl.flock` on an open file, which the kernel drops when the process dies
  (even by `kill -9`), so a stale lock file never blocks: it is taken over. The file's JSON
  (pid, host, start time) only names the holder in the refusal message.
- `heal(out)` undoes what a kill can leave behind `checkpoint.write_folder_atomically`:
  a recovery copy `.<name>.old` with no `<name>` beside it is renamed back into place, a
  `.<name>.old` beside a complete `<name>` is removed, and temporary `.<name>.tmp-<pid>`
  folders (a write that never finished) are removed, and so are the temporary files
  `.<name>.<8 random>.tmp` of `checkpoint.write_file_atomically` (summary.json, prediction
  files, the rewritten metrics log). Only names of those patterns are touched.
- `read_records(path)` reads metrics.jsonl; a torn last line (a kill mid-write) is dropped
  with a warning. A damaged line elsewhere is an error naming its line number.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator

from ..errors import RunFolderError
from ..files import write_text_atomically

LOCK_FILE = ".mtbert.lock"
# The names write_folder_atomically gives its temporary and recovery folders.
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-\d+$")
_OLD_NAME = re.compile(r"^\.(?P<name>.+)\.old$")
# The name write_file_atomically's tempfile.mkstemp gives a single file.
_TMP_FILE_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")



class TornLogWarning(UserWarning):
    """metrics.jsonl ended in a partial line (a killed write); the line was dropped."""


def prepare_out(out: Path) -> Path:
    """Create the run folder, with a one-line error when that is impossible."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"--out {str(out)!r} cannot be created: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {str(out)!r} is not writable")
    return out


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} (started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def locked_run_folder(out: Path) -> Iterator[Path]:
    """Hold the run folder's lock while the body runs; RunFolderError if another run holds it."""
    out = prepare_out(out)
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"run folder {str(out)!r} is in use by {_holder(path)}; "
                                     "wait for it to finish or choose another --out") from None
            raise
        # A holder that released and unlinked the file between our open and flock leaves us
        # locking an orphaned inode: try again on the file now at the path.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        yield out
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still under the lock, so no other run can be holding this file
        os.close(fd)


def heal(out: Path) -> list[str]:
    """Repair what a kill during an atomic folder write left in `out`; returns what was done."""
    done = []
    if not Path(out).is_dir():
        return done
    for entry in sorted(Path(out).iterdir()):
        if entry.is_file() and not entry.is_symlink() and _TMP_FILE_NAME.match(entry.name):
            entry.unlink()
            done.append(f"removed unfinished temporary file {entry.name}")
            continue
        if not entry.is_dir() or entry.is_symlink():
            continue
        m = _OLD_NAME.match(entry.name)
        if m:
            final = entry.parent / m["name"]
            if final.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed stale recovery copy {entry.name}")
            else:
                os.replace(entry, final)
                done.append(f"restored {final.name} from its recovery copy {entry.name}")
            continue
        if _TMP_NAME.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed unfinished temporary folder {entry.name}")
    return done


def read_records(path: Path) -> list[dict]:
    """The JSON records of a metrics log; a torn last line is dropped with a TornLogWarning."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            is_last = all(not rest.strip() for rest in lines[number:])
            if is_last:
                warnings.warn(f"{path}:{number}: dropped a torn last line (an interrupted write)",
                              TornLogWarning, stacklevel=2)
                continue
            raise ValueError(f"{path}:{number}: not a JSON record: {exc}") from None
        records.append(record)
    return records


def rewrite_records(path: Path, records: list[dict]) -> None:
    """Replace the log's content atomically (a kill leaves the old or the new log)."""
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
