"""GPU readiness check: one script for the first machine with a CUDA device.

Runs on a bare machine with the project's source on PYTHONPATH and a preinstalled torch;
no Ray, no network, no data sets and no scikit-learn needed (synthetic data). Each part is
timed and guarded (a failure is recorded and the next part runs):

1. environment: Python, torch, CUDA, the device, which optional modules import;
2. the CUDA test cases: ``pytest -m cuda`` over the test files that mark any (skipped, and
   said so, when pytest is absent);
3. a DFA + L1 partial balancing training run (1 epoch, synthetic clusters) on the device
   against the CPU run of the same seed: same accuracy to two test samples, losses to 1e-4
   relative (float32 sums in another order; TF32 stays off for matmuls), the float64
   function check at the boundary <= 1e-12 on both;
4. a 5-seed ensemble cell (784-256-10, batch 256, L1 partial balancing, 1 epoch) against the
   5 seeds one after another, on the device, side by side;
5. ``balance_`` on the CIFAR ResNet-18 of ``bench_torch_balance.py`` (BatchNorm drawn, eval
   mode) on the device: function change and time, against one forward+backward pass;
6. the engine's optimum for an 8 x 4096 MLP (8 Linear layers 4096 -> 4096) whose weights live
   on the device: the engine is numpy-only, so the transfer (device -> float64 host arrays)
   is timed apart from the cost graph and the solve.

Writes ``gpu_check.json`` and ``gpu_check.md`` (and the junit XML of the tests) under the
folder given. ``--device cpu`` is a dry run of the same code on the CPU with smaller sizes
(ResNet input 64 x 64, MLP width 1024, 6000 samples), to prove the script works before a
GPU is lent. Exit status 0 when every part passed, 1 when one failed, 2 on bad arguments.

Usage: PYTHONPATH=. python benchmarks/gpu_check.py OUT_DIR [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("numpy", "scipy", "pytest", "ray", "sklearn", "hypothesis", "msgpack",
            "matplotlib")
LOSS_RTOL = 1e-4
TESTS_TIMEOUT = 150


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device, repeats: int = 5) -> float:
    """Median wall seconds of ``fn`` after one warm-up call, synchronised on the device."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- 1. environment ------------------------------------------------------------------------

def environment(args: argparse.Namespace, device) -> dict:
    import torch
    modules = {}
    for name in OPTIONAL:
        try:
            module = importlib.import_module(name)
            modules[name] = getattr(module, "__version__", "present")
        except Exception as exc:  # an absent module is a figure, not a failure
            modules[name] = f"absent ({type(exc).__name__})"
    out = {"python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "device": str(device),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32), "modules": modules}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update({"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                    "device_memory_gib": round(props.total_memory / 2**30, 1)})
    return out


# -- 2. the CUDA test cases ------------------------------------------------------------------

def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.cuda" in p.read_text())


def cuda_tests(args: argparse.Namespace, device) -> dict:
    try:
        importlib.import_module("pytest")
    except ImportError:
        return {"skipped": "pytest is not installed: the CUDA test cases were not run"}
    files = cuda_test_files()
    report = Path(args.out) / "cuda_tests.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={report}", *files]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=TESTS_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "files": files, "error": f"timed out after {TESTS_TIMEOUT} s"}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures = []
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            tags = {child.tag for child in case}
            name = f"{case.get('classname')}::{case.get('name')}"
            if "skipped" in tags:
                counts["skipped"] += 1
            elif "failure" in tags:
                counts["failed"] += 1
                failures.append(name)
            elif "error" in tags:
                counts["errors"] += 1
                failures.append(name)
            else:
                counts["passed"] += 1
    selected = sum(counts.values())
    ok = done.returncode in (0, 5) and not failures and selected > 0
    if device.type == "cuda":
        ok = ok and counts["skipped"] == 0
    return {"ok": ok, "files": files, "returncode": done.returncode, **counts,
            "failures": failures, "seconds": round(time.perf_counter() - start, 2),
            "tail": done.stdout[-1500:] + done.stderr[-500:]}


# -- 3. DFA + balancing: device against CPU -------------------------------------------------

def clusters(n_train: int, n_test: int, features: int, classes: int, seed: int = 0):
    import numpy as np

    from asyncbalance.training.data import Dataset
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, features))
    y = rng.integers(0, classes, n_train + n_test)
    x = (centres[y] + rng.normal(0.0, 1.5, (y.size, features))).astype(np.float32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], (features,), classes,
                   "clusters")


def dfa_against_cpu(args: argparse.Namespace, device) -> dict:
    from asyncbalance.config import from_mapping
    from asyncbalance.training.config import TrainConfig
    from asyncbalance.training.loop import train_run

    n_train = 20000 if device.type == "cuda" else 4000
    data = clusters(n_train, 2000, 64, 10)
    config = from_mapping(TrainConfig, {
        "epochs": 1, "data": {"batch_size": 64}, "model": {"widths": [0, 256, 128, 0]},
        "trainer": {"rule": "dfa"}, "optimizer": {"name": "sgd", "lr": 0.02},
        "regulariser": {"kind": "l1", "strength": 1e-5},
        "balancing": {"mode": "partial", "p": 1.0}, "monitor": {"probe_size": 256}})
    runs = {}
    for name in ("cpu", device.type):
        start = time.perf_counter()
        runs[name] = (train_run(config, seed=0, device=name, data=data),
                      time.perf_counter() - start)
    cpu, other = runs["cpu"][0], runs[device.type][0]
    n_test = data.x_test.shape[0]
    acc_diff = abs(cpu.summary["test_accuracy"] - other.summary["test_accuracy"])
    loss_rel = max(abs(a["train_loss"] - b["train_loss"]) / abs(a["train_loss"])
                   for a, b in zip(cpu.rows[1:], other.rows[1:], strict=True))
    errors = [r.summary["max_function_rel_error_at_balance"] for r in (cpu, other)]
    ok = acc_diff <= 2 / n_test + 1e-12 and loss_rel <= LOSS_RTOL and max(errors) <= 1e-12
    return {"ok": ok, "n_train": n_train, "n_test": n_test,
            "accuracy_cpu": cpu.summary["test_accuracy"],
            f"accuracy_{device.type}": other.summary["test_accuracy"],
            "accuracy_difference": acc_diff, "accuracy_tolerance": 2 / n_test,
            "train_loss_rel_difference": loss_rel, "train_loss_rtol": LOSS_RTOL,
            "function_rel_error_at_balance": errors,
            "seconds_cpu": round(runs["cpu"][1], 3),
            f"seconds_{device.type}": round(runs[device.type][1], 3)}


# -- 4. ensemble cell on the device -----------------------------------------------------------

def ensemble_cell(args: argparse.Namespace, device) -> dict:
    from asyncbalance.config import from_mapping
    from asyncbalance.training.config import TrainConfig
    from asyncbalance.training.ensemble import train_ensemble
    from asyncbalance.training.loop import train_run

    n_train = 60000 if device.type == "cuda" else 6000
    data = clusters(n_train, 10000 if device.type == "cuda" else 1000, 784, 10, seed=1)
    config = from_mapping(TrainConfig, {
        "epochs": 1, "data": {"batch_size": 256}, "model": {"widths": [0, 256, 0]},
        "optimizer": {"name": "sgd", "lr": 1e-3}, "balancing": {"mode": "partial", "p": 1.0},
        "monitor": {"probe_size": 128, "optimum": False, "alignment": False}})
    seeds = list(range(5))
    train_run(config, 0, device=device.type, data=data)  # warm-up
    repeats = []
    worst = 0.0
    for repeat in range(2):
        times = {}
        order = ("sequential", "ensemble") if repeat == 0 else ("ensemble", "sequential")
        accs = {}
        for name in order:
            sync(device)
            start = time.perf_counter()
            if name == "sequential":
                results = [train_run(config, s, device=device.type, data=data) for s in seeds]
            else:
                results = train_ensemble(config, seeds, [data] * len(seeds), device.type)
            sync(device)
            times[name] = time.perf_counter() - start
            accs[name] = [r.summary["test_accuracy"] for r in results]
        worst = max(worst, max(abs(a - b) for a, b in zip(accs["sequential"], accs["ensemble"],
                                                          strict=True)))
        repeats.append({"sequential_s": round(times["sequential"], 3),
                        "ensemble_s": round(times["ensemble"], 3),
                        "throughput_ratio": round(times["sequential"] / times["ensemble"], 3)})
    n_test = data.x_test.shape[0]
    return {"ok": worst <= 2 / n_test + 1e-12, "n_train": n_train, "seeds": len(seeds),
            "repeats": repeats, "largest_accuracy_difference": worst}


# -- 5. balance_ on a ResNet-18-style model -------------------------------------------------

def resnet_balance(args: argparse.Namespace, device) -> dict:
    import torch

    # The ResNet-18 of benchmarks/bench_torch_balance.py (BatchNorm drawn away from its
    # defaults, eval mode), so that the GPU figures compare with BENCHMARKS.md's CPU ones.
    from bench_torch_balance import trained_like_resnet18

    from asyncbalance.torch_bridge import balance_

    model = trained_like_resnet18(0).to(device)
    side, batch = (224, 16) if device.type == "cuda" else (64, 4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, side, side, generator=generator).to(device)
    probe = torch.randn(batch, 3, side, side, generator=generator).to(device)
    target = torch.randint(0, 10, (batch,), generator=generator).to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()

    step_seconds = timed(step, device, repeats=5)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        before = model(probe)
    sync(device)
    start = time.perf_counter()
    report = balance_(model, 2.0, example=x)
    sync(device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        after = model(probe)
    change = float((after - before).abs().max() / before.abs().max())
    # float32: every rescaled weight rounds (2**-24 relative) and ~10^4-term sums round
    # along ~20 layers: a few 1e-5 of the largest output at most
    ok = change <= 1e-4 and (report.function_change_float64 or 0.0) <= 1e-9 and \
        report.cost_after < report.cost_before
    return {"ok": ok, "input": [batch, 3, side, side],
            "parameters": sum(p.numel() for p in model.parameters()),
            "balance_seconds": round(seconds, 3),
            "forward_backward_seconds": round(step_seconds, 4),
            "balance_over_forward_backward": round(seconds / step_seconds, 1),
            "function_change_probe_float32": change,
            "function_change_report_float32": report.function_change,
            "function_change_report_float64": report.function_change_float64,
            "cost_before": report.cost_before, "cost_after": report.cost_after,
            "units": report.n_units, "max_log_imbalance": report.max_log_imbalance,
            "engine_seconds_in_report": round(report.seconds, 3)}


# -- 6. the engine's optimum for an 8 x 4096 MLP -----------------------------------------------

def engine_optimum(args: argparse.Namespace, device) -> dict:
    import numpy as np
    import torch
    from torch import nn

    from asyncbalance.graph import build_cost_graph
    from asyncbalance.kernels import max_log_imbalance
    from asyncbalance.optimum import solve_optimum
    from asyncbalance.regularisers import lp
    from asyncbalance.torch_bridge import network_from_sequential

    width = 4096 if device.type == "cuda" else 1024
    layers = []
    torch.manual_seed(0)
    for i in range(8):
        layers.append(nn.Linear(width, width))
        if i < 7:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to(device)
    with torch.no_grad():  # each unit's incoming row scaled: far from balance
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(torch.exp(torch.randn(width, 1, device=device)))
    sync(device)
    start = time.perf_counter()
    network = network_from_sequential(model)
    transfer = time.perf_counter() - start
    start = time.perf_counter()
    graph = build_cost_graph(network, lp(2.0))
    build = time.perf_counter() - start
    start = time.perf_counter()
    cert = solve_optimum(graph, tol=1e-10)
    solve = time.perf_counter() - start
    residual = float(max_log_imbalance(graph, cert.log_scales))
    weights = sum(w.size for w in network.weights.values())
    return {"ok": bool(residual <= 1e-8 and np.isfinite(cert.cost)), "width": width,
            "linear_layers": 8, "weights": int(weights),
            "engine": "numpy (host); the weights are copied from the device as float64",
            "transfer_seconds": round(transfer, 3), "cost_graph_seconds": round(build, 3),
            "solve_seconds": round(solve, 3), "max_log_imbalance_at_optimum": residual,
            "newton_iterations": getattr(cert, "iterations", None)}


PARTS: tuple[tuple[str, Callable], ...] = (
    ("cuda_tests", cuda_tests), ("dfa_against_cpu", dfa_against_cpu),
    ("ensemble_cell", ensemble_cell), ("resnet18_balance", resnet_balance),
    ("engine_optimum_8x4096", engine_optimum))


def markdown(result: dict) -> str:
    lines = ["# GPU check", "", f"Command: `{result['command']}`", "",
             f"Device: {result['environment'].get('device_name', result['environment']['device'])}"
             f"; torch {result['environment']['torch']} (CUDA {result['environment']['torch_cuda']}"
             f"); Python {result['environment']['python']}; total {result['seconds']:.1f} s", "",
             "| part | ok | seconds | figures |", "|---|---|---|---|"]
    for name, part in result["parts"].items():
        figures = {k: v for k, v in part.items() if k not in ("ok", "seconds", "tail", "files",
                                                              "error_trace")}
        text = "; ".join(f"{k} = {v}" for k, v in figures.items())
        lines.append(f"| {name} | {part.get('ok', 'n/a')} | {part.get('seconds', '')} | "
                     f"{text.replace('|', '/')} |")
    lines += ["", "Optional modules: " + ", ".join(
        f"{k} {v}" for k, v in result["environment"]["modules"].items()), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for gpu_check.json, gpu_check.md, cuda_tests.xml")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default), or cpu: a dry run with smaller sizes")
    parser.add_argument("--parts", default=",".join(name for name, _ in PARTS),
                        help="comma-separated subset of: " + ", ".join(n for n, _ in PARTS))
    args = parser.parse_args()
    chosen = [p for p in args.parts.split(",") if p]
    unknown = [p for p in chosen if p not in dict(PARTS)]
    if unknown:
        print(f"gpu_check: error: --parts: unknown part {unknown[0]!r} (choose from "
              f"{', '.join(n for n, _ in PARTS)})", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"gpu_check: error: {out} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError as exc:
        print(f"gpu_check: error: torch does not import ({exc})", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda: no CUDA device is available (use --device cpu "
              "for a dry run)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    started = time.perf_counter()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "environment": environment(args, device), "parts": {}}
    for name, part in PARTS:
        if name not in chosen:
            continue
        start = time.perf_counter()
        try:
            figures = part(args, device)
        except Exception as exc:  # recorded; the next part still runs
            figures = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                       "error_trace": traceback.format_exc()[-3000:]}
        figures["seconds"] = round(time.perf_counter() - start, 2)
        result["parts"][name] = figures
        print(f"{name}: ok={figures.get('ok', 'n/a')} ({figures['seconds']} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} "
          f"({result['seconds']:.1f} s)")
    failed = [n for n, p in result["parts"].items() if p.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
