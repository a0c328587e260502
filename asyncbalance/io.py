"""File input and output: atomic writes that honour the umask, checked paths, network .npz.

Outputs are written to a temporary file beside their target and renamed into place last, so a
failed command leaves no partial file. ``tempfile`` creates files 0600 and directories 0700;
every output is given the mode the umask asks for (or, when it replaces a file, that file's
mode), as ``open`` and ``mkdir`` would have.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from .errors import InvalidInputError
from .network import check_weight_array


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no other portable way to read it; restored at once
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    return 0o666 & ~current_umask()


def new_dir_mode() -> int:
    return 0o777 & ~current_umask()


def _final_mode(target: Path) -> int:
    """The mode a file written to ``target`` should get: the replaced file's, else umask's."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return new_file_mode()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it into place on success only."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _final_mode(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new hidden directory in ``parent`` with the umask's mode (mkdtemp makes it 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, new_dir_mode())
    return path


class StagedFiles:
    """Several output files that appear together or not at all.

    ``open(target)`` writes to a temporary beside the target; ``commit()`` renames them all
    into place; leaving the ``with`` block without committing removes every temporary.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._made_dirs: list[Path] = []

    @contextlib.contextmanager
    def open(self, target: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
        final = Path(target)
        self._make_parents(final.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        self._staged.append((Path(tmp), final))
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())

    def _make_parents(self, directory: Path) -> None:
        """Create missing directories (remembered, so that a failure removes them again)."""
        missing = []
        while not directory.exists() and directory != directory.parent:
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            path.mkdir()
            self._made_dirs.append(path)

    def commit(self) -> None:
        for tmp, final in self._staged:
            os.chmod(tmp, _final_mode(final))
        for tmp, final in self._staged:
            os.replace(tmp, final)
        self._staged = []
        self._made_dirs = []

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        for path in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                path.rmdir()
        self._staged = []
        self._made_dirs = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse an output file path that cannot be written, before any work is done.

    The path must not be a directory; its nearest existing ancestor must be a directory that
    accepts new files (tried by creating and removing a temporary, which also covers
    read-only mounts). Missing directories are created when the output is written.
    """
    target = Path(path)
    if str(path) == "" or target.name in ("", ".", ".."):
        raise InvalidInputError(option, f"{str(path)!r} is not a file name")
    if target.is_dir():
        raise InvalidInputError(option, f"{target} is a directory; give a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise InvalidInputError(option, f"{target} is not writable")
    check_writable_dir(nearest_existing(target.parent), option)
    return target


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(directory: Path, option: str) -> None:
    """Refuse a directory that cannot take new files (or that is not a directory)."""
    if not directory.is_dir():
        raise InvalidInputError(option, f"{directory} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".asyncbalance-probe-", dir=directory)
    except OSError as exc:
        raise InvalidInputError(option, f"cannot create files in {directory} "
                                f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_distinct(paths: Sequence[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse two options that name the same output file."""
    seen: dict[str, str] = {}
    for option, path in paths:
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise InvalidInputError(option, f"names the same file as {seen[key]} ({path})")
        seen[key] = option


def write_json(path: str | os.PathLike, data: Mapping) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(json_text(data))


def json_text(data: Mapping) -> str:
    """Stable, readable JSON (sorted keys, numpy values as plain numbers), newline-ended."""
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def load_npz(path: str | os.PathLike, field: str = "NET") -> dict[str, np.ndarray]:
    """Read every array of an .npz file, refusing anything that is not real weights."""
    file = Path(path)
    if file.is_dir():
        raise InvalidInputError(field, f"{file} is a directory, not an .npz file")
    if not file.is_file():
        raise InvalidInputError(field, f"no such file: {file}")
    try:
        data = np.load(file, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InvalidInputError(field, f"{file} is not an .npz archive (it holds a single "
                                    ".npy array; save the weights with numpy.savez)")
        with data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except InvalidInputError:
        raise
    except PermissionError:
        raise InvalidInputError(field, f"{file} is not readable (permission denied)") from None
    except Exception as exc:  # noqa: BLE001 - whatever a malformed archive raises is bad input
        raise InvalidInputError(field, f"{file} is not a readable .npz file "
                                f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not arrays:
        raise InvalidInputError(field, f"{file} holds no arrays")
    for key, array in arrays.items():
        check_weight_array(key, array, f"in {file}: ")
    return arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no details"


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})


def write_npz(handle: IO, arrays: Mapping[str, np.ndarray]) -> None:
    """Arrays as float64 into an open binary file (e.g. from ``StagedFiles.open``)."""
    np.savez(handle, **{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})
