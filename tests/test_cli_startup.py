"""`import_torch`: torch imported with the collector paused, which is on again afterwards."""

from __future__ import annotations

import json
import subprocess
import sys


def test_torch_is_imported_with_the_collector_paused_then_frozen():
    script = (
        "import gc, json, sys\n"
        "calls = []\n"
        "gc.callbacks.append(lambda phase, info: calls.append(phase))\n"
        "from mergekit_sd.cli_startup import import_torch\n"
        "calls.clear()\n"
        "torch = import_torch()\n"
        "print(json.dumps({'torch': torch is sys.modules['torch'], 'collections': len(calls),\n"
        "                  'enabled': gc.isenabled(), 'frozen': gc.get_freeze_count(),\n"
        "                  'again': import_torch() is torch}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    seen = json.loads(done.stdout)
    assert seen["torch"] and seen["again"] and seen["enabled"]
    assert seen["collections"] == 0  # none while torch was imported
    assert seen["frozen"] > 10_000  # torch's objects, out of later collections' way
