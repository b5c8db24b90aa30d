"""Worker start-up order: torch is loaded before the worker can join, never from a side thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import DATA

REPO = DATA.parent

# Loading libtorch holds the GIL for seconds on a cold page cache (dlopen of the CUDA build). When it
# happened lazily in the compute thread, every freshly joined worker of a chaos run missed its
# heartbeats and was declared failed; a fresh interpreter is the only honest way to watch the order.
SCRIPT = textwrap.dedent(
    """
    import sys
    from common.config import Config
    from worker.worker import Worker

    w = Worker(Config(coordinator="127.0.0.1:9", standby="", preload_models=""), sys.argv[1])
    before = "torch" in sys.modules
    w.start()
    print(before, "torch" in sys.modules, w.joined)
    w.shutdown(leave=False)
    """
)


def test_worker_loads_torch_on_start_before_joining(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "False"]
