"""Outputs never replace what is at their path: links are written through, devices and FIFOs
are written into, block devices and sockets are refused, and a report never overwrites the
records it reads.

Every special file here is made in ``tmp_path`` (``os.mknod`` of a character device with
``/dev/null``'s numbers, a FIFO, a block device node that is never opened, a unix socket):
no real system file is touched.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from asyncbalance.cli import main
from asyncbalance.io import StagedFiles, atomic_write, write_json

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "asyncbalance" / "data" / "example_mlp.npz"


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _null_device(path: Path) -> Path:
    """A character device node with /dev/null's numbers (1, 3), private to the test."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


def _balanced_reference(tmp_path: Path) -> dict[str, np.ndarray]:
    plain = tmp_path / "reference.npz"
    code, _, err = _run_cli(["balance", str(EXAMPLE), "--p", "2", "-o", str(plain), "--quiet"])
    assert code == 0, err
    with np.load(plain) as data:
        return {k: data[k] for k in data.files}


def test_output_onto_a_character_device_writes_into_it(tmp_path: Path) -> None:
    device = _null_device(tmp_path / "null")
    code, _, err = _run_cli(["balance", str(EXAMPLE), "--p", "2", "-o", str(device),
                             "--report", str(tmp_path / "r.json"), "--quiet"])
    assert code == 0, err
    mode = os.lstat(device).st_mode
    assert stat.S_ISCHR(mode), "the device node was replaced by a regular file"
    assert os.major(os.lstat(device).st_rdev) == 1 and os.minor(os.lstat(device).st_rdev) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_into_a_fifo_streams_the_archive(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, _, err = _run_cli(["balance", str(EXAMPLE), "--p", "2", "-o", str(fifo), "--quiet"])
    reader.join(timeout=30)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with np.load(io.BytesIO(received[0])) as data:
        streamed = {k: data[k] for k in data.files}
    reference = _balanced_reference(tmp_path)
    assert streamed.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(streamed[key], reference[key])  # same computation


def test_output_through_a_symlink_replaces_the_linked_file(tmp_path: Path) -> None:
    target = tmp_path / "real" / "out.npz"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    code, _, err = _run_cli(["balance", str(EXAMPLE), "--p", "2", "-o", str(link), "--quiet"])
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    reference = _balanced_reference(tmp_path)
    with np.load(target) as data:
        for key in reference:
            np.testing.assert_array_equal(data[key], reference[key])


def test_output_through_a_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    target = tmp_path / "made.npz"
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    code, _, err = _run_cli(["balance", str(EXAMPLE), "--p", "2", "-o", str(link), "--quiet"])
    assert code == 0, err
    assert link.is_symlink() and target.is_file()


def test_balancing_in_place_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    target = tmp_path / "net.npz"
    shutil.copyfile(EXAMPLE, target)
    link = tmp_path / "alias.npz"
    link.symlink_to(target.name)
    code, _, err = _run_cli(["balance", str(link), "--p", "2", "-o", str(link), "--quiet"])
    assert code == 0, err
    assert link.is_symlink()
    reference = _balanced_reference(tmp_path)
    with np.load(target) as data:
        for key in reference:
            np.testing.assert_array_equal(data[key], reference[key])


def test_block_device_and_socket_outputs_are_refused(tmp_path: Path) -> None:
    block = tmp_path / "disk"
    try:
        # Loop-device numbers; the node is only looked at, never opened.
        os.mknod(block, 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    except PermissionError:
        pytest.skip("making a device node needs root")
    sock_path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    try:
        for target, word in ((block, "block device"), (sock_path, "socket")):
            code, out, err = _run_cli(["balance", str(EXAMPLE), "--p", "2", "-o", str(target),
                                       "--quiet"])
            assert code == 2, err
            assert "-o/--output" in err and word in err and len(err.strip().splitlines()) == 1
        assert stat.S_ISBLK(os.lstat(block).st_mode)
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    finally:
        server.close()


def test_symlink_loop_output_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    code, _, err = _run_cli(["balance", str(EXAMPLE), "--p", "2", "-o", str(a), "--quiet"])
    assert code == 2 and "loop" in err, err
    assert a.is_symlink() and b.is_symlink()


def test_library_writers_keep_links_and_devices(tmp_path: Path) -> None:
    device = _null_device(tmp_path / "null")
    write_json(device, {"a": 1})
    with atomic_write(device, "wb") as handle:
        handle.write(b"x" * 100)
    with StagedFiles() as staged:
        with staged.open(device, "w") as handle:
            handle.write("text")
        staged.commit()
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    target = tmp_path / "t.json"
    target.write_text("{}")
    target.chmod(0o640)
    link = tmp_path / "l.json"
    link.symlink_to(target)
    write_json(link, {"b": 2})
    assert link.is_symlink() and '"b": 2' in target.read_text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json", "null", "t.json"]


def test_convergence_plot_breaks_at_a_pause_in_sampling() -> None:
    from asyncbalance.runtime.record import break_gaps

    times = [0.0, 1.0, 2.0, 3.0, 50.0, 51.0, 52.0]
    t, v = break_gaps(times, [1.0] * len(times))
    assert len(t) == len(times) + 1 and np.isnan(v[4]) and 3.0 < t[4] < 50.0
    assert np.isfinite(break_gaps(times[:4], [1.0] * 4)[1]).all()


def test_a_sweep_over_seeds_is_averaged_with_its_range() -> None:
    from asyncbalance.runtime.record import sweep_series

    rows = [{"sweep": {"links.mean": m, "seed": s, "balance.rule": r}, "time_to_tol": t}
            for (m, s, r, t) in [(0.5, 1, "exact", 10.0), (0.5, 2, "exact", 14.0),
                                 (1.0, 1, "exact", 20.0), (1.0, 2, "exact", None),
                                 (0.5, 1, "damped", 30.0), (0.5, 2, "damped", 30.0)]]
    series = sweep_series(rows, "links.mean", ["seed", "balance.rule"])
    assert sorted(series) == ["balance.rule=damped", "balance.rule=exact"]  # one per rule
    (x0, mean0, lo0, hi0, n0), (x1, mean1, *_rest) = series["balance.rule=exact"]
    assert (x0, mean0, lo0, hi0, n0) == (0.5, 12.0, 10.0, 14.0, 2)
    assert x1 == 1.0 and np.isnan(mean1)  # one seed did not converge: no mean drawn
