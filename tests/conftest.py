import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the network; set before huggingface_hub loads
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: a second thread per worker, or in the processes a test starts,
    # would oversubscribe the cores.
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import save_tiny_source  # noqa: E402
torch.set_num_threads(min(2, torch.get_num_threads()))  # 1 under xdist: OMP_NUM_THREADS is read at import

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(arch) -> (source_dir, output_dir), converting each tiny architecture once per session."""
    import adapt

    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(arch)
            save_tiny_source(root / "src", arch)
            adapt.convert(root / "src", root / "dlm")
            cache[arch] = (root / "src", root / "dlm")
        return cache[arch]

    return get


@pytest.fixture
def newer_transformers(monkeypatch):
    """The installed transformers, as the compatibility guard sees it, becomes a minor release newer than any tested
    one (the guard's behaviour on the next release, whatever release is installed)."""
    from adapt.model import transformers_compat as compat

    major, minor, _ = compat._release(compat.installed_transformers())
    previous = f"{major}.{minor - 1}.0" if minor else f"{major - 1}.999.0"
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS", (compat.TESTED_TRANSFORMERS[0], previous))
    assert compat.newer_than_tested(compat.installed_transformers())
    return previous


if os.environ.get("DLM_ADAPT_SIMULATE_NEWER_TRANSFORMERS") == "1":
    # `DLM_ADAPT_SIMULATE_NEWER_TRANSFORMERS=1 python -m pytest tests`: the whole suite as it runs on the day a
    # transformers release comes out that no dlm-adapt release was tested on (in this process; the remote-code
    # copies that transformers imports from checkpoints keep their own list)
    @pytest.fixture(autouse=True)
    def _simulate_newer_transformers(newer_transformers):
        yield


def pytest_collection_modifyitems(items):
    # pytest-xdist hands tests out in collection order (two at a time per worker: --maxschedchunk=1 in
    # pyproject.toml) and the run lasts as long as its busiest worker: a long test collected late (test_sft's
    # recipe run, alphabetically near the end) would run alone at the end. The sort is stable and the same in
    # every worker, as xdist requires.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def require_shared():
    if not STORIES.is_dir():
        pytest.skip(f"real-model test needs ../shared/models/stories260K beside the checkout ({STORIES} not found)")
    return STORIES


@pytest.fixture
def fresh_accelerate_state():
    """For files that run several Accelerate runs in one process: Accelerate keeps the first Accelerator's state
    (mixed precision among it) for the whole process unless it is reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
