"""The store is light: importing every module of feedback.store loads no torch (the bot imports it)."""

import subprocess
import sys


def test_import_store_loads_no_torch():
    code = (
        "import sys, pkgutil, importlib, feedback.store\n"
        "names = [m.name for m in pkgutil.walk_packages(feedback.store.__path__, 'feedback.store.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "assert len(names) >= 8, names\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
