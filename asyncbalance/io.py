"""File input and output: atomic writes that honour the umask, checked paths, network .npz.

Outputs are written to a temporary file beside their target and renamed into place last, so a
failed command leaves no partial file. ``tempfile`` creates files 0600 and directories 0700;
every output is given the mode the umask asks for (or, when it replaces a file, that file's
mode), as ``open`` and ``mkdir`` would have.

An output path is followed as ``open`` would follow it: through a symbolic link the file the
link names is replaced (the link stays a link); an existing character device or FIFO (such as
``/dev/null``) is written into, never replaced by a regular file; a block device or a socket is
refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
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


def output_target(path: str | os.PathLike) -> tuple[Path, bool]:
    """Where an output named ``path`` really goes: ``(file, False)`` for a regular file or a
    new name, reached through any symbolic links (the file to replace atomically);
    ``(path, True)`` for an existing character device or FIFO, which is written into.

    A directory, a block device, a socket or a loop of links is refused (``OSError`` naming
    ``path``): replacing any of them with a regular file would destroy what was there.
    """
    target = Path(path)
    try:
        info = os.stat(target)  # follows links, as open() would
    except (FileNotFoundError, NotADirectoryError):
        # A new name, or a link to a missing file: the link's target is created.
        return Path(os.path.realpath(target)), False
    if stat.S_ISREG(info.st_mode):
        return Path(os.path.realpath(target)), False
    if stat.S_ISCHR(info.st_mode) or stat.S_ISFIFO(info.st_mode):
        return target, True
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory; give a file name", str(path))
    kind = "a block device" if stat.S_ISBLK(info.st_mode) else "a socket or other special file"
    raise OSError(errno.EPERM, f"is {kind}; refusing to write over it", str(path))


def _copy_into(source: IO, target: Path, mode: str) -> None:
    """Write what ``source`` holds into the existing special file ``target``."""
    source.seek(0)
    with open(target, "w" if "b" not in mode else "wb") as out:
        shutil.copyfileobj(source, out)


def _spool_mode(mode: str) -> str:
    return "w+b" if "b" in mode else "w+"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it into place on success only.

    Through a symbolic link the linked file is replaced; an existing character device or FIFO
    gets the bytes written into it once they are complete (see ``output_target``).
    """
    target, in_place = output_target(path)
    if in_place:
        with tempfile.TemporaryFile(_spool_mode(mode)) as spool:
            yield spool
            _copy_into(spool, target, mode)
        return
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
        self._in_place: list[tuple[Path, Path, str]] = []
        self._made_dirs: list[Path] = []

    @contextlib.contextmanager
    def open(self, target: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
        final, in_place = output_target(target)
        if in_place:
            # A device or FIFO cannot be renamed over: spool, then write into it on commit.
            fd, spool = tempfile.mkstemp(prefix=".asyncbalance-spool-", suffix=".tmp")
            self._in_place.append((Path(spool), final, mode))
            with os.fdopen(fd, _spool_mode(mode)) as handle:
                yield handle
            return
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
        in_place, self._in_place = self._in_place, []
        for spool, final, mode in in_place:
            try:
                with open(spool, _spool_mode(mode).replace("w", "r")) as source:
                    _copy_into(source, final, mode)
            finally:
                spool.unlink(missing_ok=True)

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        for spool, _, _ in self._in_place:
            spool.unlink(missing_ok=True)
        self._in_place = []
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
    try:
        final, in_place = output_target(target)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidInputError(option, f"{target} is a loop of symbolic links") from None
        raise InvalidInputError(option, f"{target} {exc.strerror}") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise InvalidInputError(option, f"{target} is not writable")
    if not in_place:
        # The file is created beside the one the path (or its link) names.
        check_writable_dir(nearest_existing(final.parent), option)
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


def check_input_file(path: str | os.PathLike, field: str, what: str) -> Path:
    """``path`` as an input file: it must exist and be a regular file (a FIFO or a device
    such as /dev/zero would block or never end); each refusal names ``field``."""
    file = Path(path)
    try:
        info = os.stat(file)
    except FileNotFoundError:
        raise InvalidInputError(field, f"no such file: {file}") from None
    except OSError as exc:
        raise InvalidInputError(field, f"{file} cannot be read ({exc.strerror or exc})") \
            from None
    if stat.S_ISDIR(info.st_mode):
        raise InvalidInputError(field, f"{file} is a directory, not a {what} file")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else
                "a character device" if stat.S_ISCHR(info.st_mode) else
                "a block device" if stat.S_ISBLK(info.st_mode) else "a socket")
        raise InvalidInputError(field, f"{file} is {kind}, not a regular {what} file")
    return file


def load_npz(path: str | os.PathLike, field: str = "NET") -> dict[str, np.ndarray]:
    """Read every array of an .npz file, refusing anything that is not real weights."""
    file = check_input_file(path, field, ".npz")
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
