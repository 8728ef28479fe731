import os
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
