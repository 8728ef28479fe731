import contextlib, io, json, os, shutil, subprocess
from pathlib import Path
import pytest

def _shared_data():
    env = os.environ.get("SPN4CIR_SHARED_DATA")
    if env: return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"

@pytest.fixture(scope="session")
def shared_data() -> Path:
    "The real FashionIQ / CIRR annotation files, or a skip when they are absent."
    path = _shared_data()
    if not (path / "fashioniq").is_dir() or not (path / "cirr").is_dir():
        pytest.skip(f"real annotation files not found at {path} (set SPN4CIR_SHARED_DATA to their folder)")
    return path

@pytest.fixture(scope="session")
def benchmark_data():
    "A function: the real CIRCO or GeneCIS annotation folder by name, or a skip when it is absent."
    def folder(name:str) -> Path:
        path = _shared_data() / name
        if not path.is_dir(): pytest.skip(f"real {name} annotation files not found at {path} (set SPN4CIR_SHARED_DATA to their folder)")
        return path
    return folder

@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """A function: a fresh folder for a module's shared fixtures, by name.

    The folders go when the module's tests are done and none of them failed, so a full run never holds more than one
    module's checkpoints on disk (pytest's own retention keeps module folders until the session ends)."""
    made, failed_before = [], request.session.testsfailed
    def make(name:str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]
    yield make
    if request.session.testsfailed == failed_before:
        for folder in made: shutil.rmtree(folder, ignore_errors=True)

@pytest.fixture(scope="session")
def cli():
    """A function: run `spn4cir ARGS` in this process through `spn4cir.cli.main`, the function the console script calls (a new
    interpreter would spend about 7 s importing torch and open_clip on every call; `test_cli.py` runs the installed script itself).
    Returns stdout parsed as JSON; with `ok=False`, a `CompletedProcess` holding the exit code and both streams."""
    from spn4cir.cli import main
    def run(*args, ok=True):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try: code = main([str(a) for a in args])
            except SystemExit as exit: code = exit.code          # argparse's usage errors
        done = subprocess.CompletedProcess(["spn4cir", *map(str, args)], code, out.getvalue(), err.getvalue())
        if not ok: return done
        assert code == 0, done.stderr[-3000:]
        return json.loads(done.stdout)
    return run
