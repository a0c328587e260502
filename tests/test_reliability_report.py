"""``asyncbalance report`` never overwrites the run records it reads, nor, without
``--overwrite``, an existing report or its plots."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from asyncbalance.cli import main
from asyncbalance.training.records import write_run


def _run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _records(root: Path) -> Path:
    summary = {"name": "demo", "label": "a", "seed": 0, "trainer": "backprop",
               "test_accuracy": 0.5, "best_test_accuracy": 0.5, "train_accuracy": 0.5}
    rows = [{"epoch": 0, "test_accuracy": 0.5, "seconds": 1.0},
            {"epoch": 1, "test_accuracy": 0.6, "seconds": 1.0}]
    return write_run(root / "runs" / "seed-0", summary, rows)


def test_report_refuses_to_write_over_its_inputs(tmp_path: Path) -> None:
    run = _records(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    link = tmp_path / "alias.md"
    link.symlink_to(run / "summary.json")
    for target in (run / "summary.json", run / "epochs.csv", link):
        for extra in ([], ["--overwrite"]):
            code, err = _run_cli(["report", str(tmp_path / "runs"), "-o", str(target), *extra])
            assert code == 2, err
            assert "one of the run records the report reads" in err
            assert len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_report_refuses_existing_outputs_without_overwrite(tmp_path: Path) -> None:
    _records(tmp_path)
    out = tmp_path / "rep" / "r.md"
    out.parent.mkdir()
    out.write_text("my notes")
    code, err = _run_cli(["report", str(tmp_path / "runs"), "-o", str(out)])
    assert code == 2 and "already exists" in err and "--overwrite" in err, err
    assert out.read_text() == "my notes"
    assert _run_cli(["report", str(tmp_path / "runs"), "-o", str(out), "--overwrite"])[0] == 0
    plots = sorted(p.name for p in out.parent.glob("*.png"))
    assert plots, "the report wrote no plots"
    # A plot of an earlier report under the same name is not replaced either.
    out.unlink()
    png = out.parent / plots[0]
    mark = png.read_bytes()
    code, err = _run_cli(["report", str(tmp_path / "runs"), "-o", str(out)])
    assert code == 2 and plots[0] in err, err
    assert png.read_bytes() == mark and not out.exists()


def test_report_plot_names_are_the_ones_checked(tmp_path: Path) -> None:
    from asyncbalance.commands.report import PLOT_SUFFIXES

    _records(tmp_path)
    out = tmp_path / "rep" / "r.md"
    assert _run_cli(["report", str(tmp_path / "runs"), "-o", str(out)])[0] == 0
    for png in out.parent.glob("*.png"):
        assert png.name.startswith("r-") and png.name.endswith(PLOT_SUFFIXES), png.name


def test_report_pairs_labels_by_seed_with_an_interval() -> None:
    import math

    from scipy import stats

    from asyncbalance.training.report import Run, _paired_lines

    def runs(label: str, accs: dict[int, float]) -> list[Run]:
        return [Run(path=Path(f"{label}-{s}"), summary={"seed": s, "label": label,
                                                         "test_accuracy": a}, rows=[])
                for s, a in accs.items()]

    base = {0: 0.80, 1: 0.82, 2: 0.78, 3: 0.81}
    other = {0: 0.85, 1: 0.86, 2: 0.84, 3: 0.88, 9: 0.99}   # seed 9 has no partner
    lines = _paired_lines({"a": runs("a", base), "b": runs("b", other)})
    row = next(line for line in lines if line.startswith("| b |"))
    d = [other[s] - base[s] for s in base]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert f"| b | 4 | {100 * mean:+.2f} points [{100 * (mean - half):+.2f}, " \
           f"{100 * (mean + half):+.2f}]" in row
    assert row.endswith("| higher |")
