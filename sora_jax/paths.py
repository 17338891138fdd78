"""Where runs write: workdirs and outputs on the local disk or in Cloud Storage (`gs://...`).

On a Cloud TPU slice every host must reach the workdir, so it lives in a bucket
(experiments/launch_tpu.sh). Everything that reads or writes a workdir goes through `path`, an
`etils.epath.Path`: local paths are made absolute, URIs stay as they are. Checkpoints are orbax's
(tensorstore writes the arrays, google-cloud-storage lists and renames); config.json,
metrics.jsonl, samples and evaluations go through epath, which reaches `gs://` with `gcsfs`;
tensorboardX writes event files with google-cloud-storage. `pip install -e '.[gcs]'` installs both.

Files are written whole and then moved into place, so a reader never sees a torn file: locally by
a rename, in a bucket by one upload (object writes are atomic there).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from etils import epath


def is_local(location: str | os.PathLike) -> bool:
    """True for paths on this machine's file system, False for URIs such as gs://bucket/run."""
    return "://" not in os.fspath(location)


def path(location: str | os.PathLike) -> epath.Path:
    """`location` as an epath.Path: local paths made absolute, URIs as they are."""
    location = os.fspath(location)
    return epath.Path(os.path.abspath(location) if is_local(location) else location)


def write_file(location: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> str:
    """Calls write(local_file) to make the file at `location`, then moves it there whole; creates
    the folder. `suffix` is the local file's extension, for writers that go by it. Returns the
    location as given."""
    target = path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_local(location):
        tmp = f"{target}.tmp{suffix}"
        write(tmp)
        os.replace(tmp, target)
        return os.fspath(location)
    with tempfile.TemporaryDirectory() as folder:
        tmp = os.path.join(folder, "file" + suffix)
        write(tmp)
        epath.Path(tmp).copy(target, overwrite=True)
    return os.fspath(location)


def write_text(location: str | os.PathLike, text: str) -> str:
    """Writes `text` to `location` whole (see `write_file`)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write_file(location, write)


class JsonLines:
    """Lines appended to a file: in place locally; in a bucket, whose objects cannot be appended
    to, the whole file is written again with each line added (metrics files stay small)."""

    def __init__(self, location: str | os.PathLike):
        self.location = location
        target = path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._lines = None
        self._file = None
        if is_local(location):
            self._file = open(target, "a")
        else:
            self._lines = target.read_text().splitlines(keepends=True) if target.exists() else []

    def write(self, line: str) -> None:
        line = line if line.endswith("\n") else line + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            write_text(self.location, "".join(self._lines))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
