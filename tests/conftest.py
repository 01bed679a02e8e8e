"""Test set-up: eight simulated CPU devices and a deterministic hypothesis profile.

XLA_FLAGS must be set before JAX initialises its backends, so it is set here, at import time of
the test session, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO / "tests" / "data"


def reference_file(name: str) -> Path:
    """A file of the book's reference data, shipped in ``tests/data/`` (see its README)."""
    path = REFERENCE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"reference data {path} is missing from the repository (tests/data/).")
    return path


def load_config(name: str, arg: str | None = None):
    """``configs/<name>.py`` -> ``get_config(arg)``, as ``--config=configs/<name>.py:<arg>`` does."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
