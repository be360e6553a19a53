import os
import sys

import pytest
import torch

pytest.register_assert_rewrite("helpers")  # its asserts (torchrun comparisons) print their values on failure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
torch.set_num_threads(1)  # tiny models on 2 shared cores: one thread is many times faster

import models  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavier end-to-end checks (still run in CI)")


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """One tiny random pipeline folder per family, built once per test session."""
    import tiny_models
    out = {}
    for fam in tiny_models.SIZES:
        folder = tmp_path_factory.mktemp(fam)
        tiny_models.build(fam, str(folder))
        out[fam] = str(folder)
    return out


@pytest.fixture(scope="session")
def toy_model():
    if not os.path.exists(os.path.join(models.MODEL_ALIASES["toy"], "transformer")):
        pytest.fail("assets/toy is missing: run `python pretrain_toy.py --stop-at 11000 --out assets/toy --overwrite` (it ships with the repository)")
    return models.load_model("toy")


@pytest.fixture(scope="session")
def videoscore_folder(tmp_path_factory):
    import tiny_models
    folder = tmp_path_factory.mktemp("videoscore")
    base, head = tiny_models.build_videoscore(str(folder))
    return str(folder), base, head


@pytest.fixture(scope="session")
def qwen_vl_folder(tmp_path_factory):
    import tiny_models
    folder = tmp_path_factory.mktemp("qwen_vl")
    tiny_models.build_qwen_vl(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    import tiny_models
    folder = tmp_path_factory.mktemp("clip")
    tiny_models.build_clip(str(folder))
    return str(folder)
