"""The index arithmetic of the CUDA scans (csrc/cuda/plan.h), on the CPU: tests/cpp/scan_plan_test.cpp runs the
three passes of the forward and backward scans, for both plans (whole blocks, split blocks), dense and packed with
empty sequences, 3000 random cases, against the block-causal means and gradients computed directly;
tests/cpp/rope_lanes_test.cpp checks the lanes of the rope scans (each channel owned once, partners in one warp,
the turn of the features and of the gradient computed lane by lane against the rotation of whole rows). They need
a C++ compiler only (no torch, no CUDA)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_and_run(tmp_path, name):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++)")
    exe = tmp_path / name
    src = os.path.join(ROOT, "tests", "cpp", f"{name}.cpp")
    r = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{ROOT}/csrc/internal", f"-I{ROOT}/csrc/cuda",
                        src, "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, f"compiling {src} failed:\n{r.stderr}"
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)


def test_scan_plan(tmp_path):
    r = build_and_run(tmp_path, "scan_plan_test")
    assert r.returncode == 0, f"the scan plan does not compute the block-causal scans:\n{r.stdout}{r.stderr}"
    assert "3000 cases passed" in r.stdout, r.stdout


def test_rope_lanes(tmp_path):
    r = build_and_run(tmp_path, "rope_lanes_test")
    assert r.returncode == 0, f"the rope scans' lanes do not compute the rotation:\n{r.stdout}{r.stderr}"
    assert "2000 cases passed" in r.stdout, r.stdout
