"""The core package needs none of the optional integrations; pom_ext.hf says what to install when they are
missing. Each case runs in a fresh interpreter with the integration hidden from imports."""
import subprocess
import sys

import pytest

HIDE_TRANSFORMERS = "import sys; sys.modules['transformers'] = None\n"


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_core_imports_without_transformers():
    r = run(HIDE_TRANSFORMERS + "import pom_ext, pom_ext.models\n"
            "assert 'transformers' not in {m for m in sys.modules if sys.modules[m] is not None}\n"
            "print(pom_ext.PoM(16, degree=2, expand=2)(__import__('torch').randn(1, 5, 16)).shape)")
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 5, 16])" in r.stdout


@pytest.mark.parametrize("hidden,expected", [
    ("sys.modules['transformers'] = None", "pom_ext.hf needs Hugging Face Transformers: pip install"),
    # a transformers without the 5.x cache API
    ("import types; sys.modules['transformers'] = types.SimpleNamespace(__version__='4.40.0')",
     "pom_ext.hf needs transformers >= 5.25, found 4.40.0"),
])
def test_hf_without_transformers_says_what_to_install(hidden, expected):
    r = run("import sys\n" + hidden + "\ntry:\n    import pom_ext.hf\nexcept ImportError as e:\n    print('ERR', e)\n")
    assert r.returncode == 0, r.stderr
    assert expected in r.stdout, r.stdout
