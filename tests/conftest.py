"""Shared fixtures: a tiny random config, tiny GGUF files, and the real default model."""

from __future__ import annotations

import os

# Tests compare fp32 numerics; keep XLA from picking faster, less exact CPU paths. Appended,
# so flags already set (make test's second pass: --xla_cpu_max_isa=AVX) stay in force.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_fast_math=false"]).strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxinfer.checkpoints import sources  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402

TINY = ModelConfig(
    architecture="llama",
    vocab_size=256,
    embed_dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
    max_seq_len=128,
    rope_theta=10_000.0,
    rms_eps=1e-5,
)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return TINY


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    import jax

    from jaxinfer.models import llama

    return llama.init_params(tiny_cfg, jax.random.key(0))


@pytest.fixture(scope="session")
def smollm2_path():
    try:
        return sources.resolve(sources.DEFAULT_MODEL)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The real default model in fp32, loaded once per test session."""
    import jaxinfer

    return jaxinfer.load_model(str(smollm2_path), dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' model on the same GGUF (dequantized to fp32): the numerical reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --- CPU kernels (issue 11): `pytest --cpu-kernels=off` runs the suite on XLA's own products
# (the fallback CI keeps correct); it switches jaxinfer.kernels.cpu off for this process.
def pytest_addoption(parser):
    parser.addoption("--cpu-kernels", choices=("on", "off"), default="on",
                     help="off: every model uses XLA's products instead of jaxinfer's CPU kernels")


def pytest_configure(config):
    if config.getoption("--cpu-kernels") == "off":
        from jaxinfer.kernels import cpu

        cpu.set_enabled(False)


@pytest.fixture(autouse=True, scope="module")
def _forget_compiled_programs():
    """Frees each test file's compiled programs after it: XLA:CPU maps every program's code
    separately, and the whole suite in one process would otherwise pass the kernel's limit on
    memory mappings per process and crash inside XLA (see runtime.forget_compiled)."""
    yield
    from jaxinfer import runtime

    runtime.forget_compiled()


# --- Crash diagnostics: a crash inside XLA kills pytest before it reports anything, and CI
# shows only the end of the output. With JAXINFER_TEST_PROGRESS=FILE, each test's id is written
# there as it starts, so .ci/run can name the test a crash happened in.
def pytest_runtest_logstart(nodeid, location):
    if path := os.environ.get("JAXINFER_TEST_PROGRESS"):
        with open(path, "w") as f:
            f.write(nodeid + "\n")
