"""Test setup: the CPU with 8 fake devices (so sharding tests can build real meshes) unless JAX_PLATFORMS says
otherwise; on a GPU, float32 dots at float32 precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if os.environ["JAX_PLATFORMS"] != "cpu":
    # the tests compare float32 computations with float32/float64 references; on a GPU XLA's default for float32
    # dots is TF32 (~5e-4 relative error), so ask for float32 as the CPU computes it
    jax.config.update("jax_default_matmul_precision", "highest")

# one compilation cache for the xdist workers of a run (its uid names it): the workers compile many of the same
# programs (the built-in model's prefill and decode loops), and a fresh machine starts it empty
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN and os.environ["JAX_PLATFORMS"] == "cpu":
    jax.config.update("jax_compilation_cache_dir", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"lcjax-xla-{_RUN}"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def llama():
    """The tiny random Llama fixture (float32) as an lcjax model; modules that want its reference ids too
    define their own `llama`."""
    import lcjax

    model, _ = lcjax.load_model(FIXTURES / "hf" / "llama", dtype="float32")
    return model


def prompt_of(model, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random token ids of `shape` in the model's vocabulary."""
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, shape)


@pytest.fixture(scope="module")
def smollm2():
    """The built-in SmolLM2-135M-Instruct (model, tokenizer) in float32; skips when it is not installed."""
    import lcjax

    try:
        return lcjax.load_model("smollm2-135m", dtype="float32")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops jax's compiled programs after each test module. Each XLA CPU executable keeps memory mappings of
    its own (the suite's process held up to ~19,000 within one module); run in one process without this, the
    suite crashed inside XLA's CPU compiler (SIGSEGV or SIGABRT) at the same late test three times, a test
    that passes alone: most likely the kernel's limit of 65530 mappings per process (`vm.max_map_count`)."""
    yield
    import jax

    jax.clear_caches()
