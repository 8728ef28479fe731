import subprocess, sys
from pathlib import Path

def spn4cir_exe() -> str:
    "The `spn4cir` console script installed beside this Python."
    return str(Path(sys.executable).parent / "spn4cir")

def test_console_script_prints_usage():
    "The installed `spn4cir` entry point runs and lists its subcommands."
    out = subprocess.run([spn4cir_exe(), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: spn4cir" in out.stdout

def test_missing_subcommand_is_an_error():
    out = subprocess.run([spn4cir_exe()], capture_output=True, text=True)
    assert out.returncode == 2 and "COMMAND" in out.stderr
