import os
import tempfile

# A fresh Inductor cache per test session: a cache left by an older fastpref (another custom-op schema) on the
# same machine would be reused and fail (tests/test_compile.py).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastpref-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores on CI: keep intra-op threads bounded and deterministic.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
