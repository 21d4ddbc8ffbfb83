"""The bot is light: importing it (and the shared shell) loads no torch."""

import subprocess
import sys


def test_import_bot_loads_no_torch():
    code = (
        "import sys, pkgutil, importlib, bot, smolcord.cli, smolcord.settings\n"
        "for m in pkgutil.walk_packages(bot.__path__, 'bot.'): importlib.import_module(m.name)\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
