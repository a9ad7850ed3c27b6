"""Build options: a value the builds do not know stops them with a message naming the option and what it takes
(setup.py's environment variables, the CMake cache variables); both are read before anything is compiled."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value, ok", [("avx2", False), ("every", False), ("base", True), ("ALL", True)])
def test_setup_py_cpu_isas(value, ok):
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "POM_EXT_CPU_ISAS": value})
    if ok:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == "pom_ext"
    else:
        assert r.returncode != 0
        assert f"POM_EXT_CPU_ISAS must be 'all' (the default) or 'base', got '{value.lower()}'" in r.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_cpu_isas(tmp_path):
    r = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path), "-DPOM_EXT_CPU_ISAS=avx2"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "POM_EXT_CPU_ISAS must be all or base, got 'avx2'" in r.stderr
