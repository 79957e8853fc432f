"""Session-wide test settings."""
from __future__ import annotations

import os
import sys
import tempfile

import pytest

# `import fvcore.nn` calls torch.jit.script, which torch >= 2.14 deprecates. The warning is not ours and
# can't be fixed here, so it must not fail tests even under `-W error` or `filterwarnings = error`.
FVCORE_JIT_WARNING = "ignore:`torch.jit.script` is deprecated"

# One thread: the tests run tiny models, where a second thread costs more than it gives (up to 10x slower
# on a busy 2-core machine), and several test processes may run at once. Subprocesses inherit this.
THREADS = 1
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# Latency tables (nasloc.deploy.latency) of the test runs go to a temporary folder, not the user's ~/.cache.
os.environ.setdefault("NASLOC_LATENCY_DIR", os.path.join(tempfile.gettempdir(), f"nasloc-test-latency-{os.getuid()}"))


def pytest_configure(config: pytest.Config) -> None:
    # Command-line filters outrank ini and marker-less filters, and the last one given wins, so append.
    namespace = config.known_args_namespace
    namespace.pythonwarnings = [*(namespace.pythonwarnings or []), FVCORE_JIT_WARNING]


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Only if a test module brought torch in anyway: importing it here would slow down every test run.
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)
