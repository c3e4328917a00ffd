"""Every test process sees 8 fake CPU devices, set before anything imports jax."""
import os

# The tests' shapes are small: compiling, not running, takes most of their time. LLVM at -O0
# compiles XLA's CPU code ~1.6x faster (the whole suite: RESULTS.md, "The suite's compile
# time"); XLA's own HLO passes, hence what is computed, are unchanged. Every test and its
# subprocesses (tests/fixtures.py::xla_flags) take these flags; SSL_US_TEST_XLA_FLAGS= runs
# the suite at XLA's default optimisation.
os.environ.setdefault("SSL_US_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      + os.environ["SSL_US_TEST_XLA_FLAGS"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

# Tests compile many identical steps (same shapes, several runs per test); a session-wide
# persistent compilation cache makes the repeats cheap.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "ssl_us_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_configure(config):
  # tensorflow_datasets (4.9.x) calls protobuf's deprecated FieldDescriptor.label() inside its
  # own logging wrapper whenever it reads a dataset's metadata; not ours to fix or to hide
  # elsewhere, so only that message from that package is ignored.
  config.addinivalue_line(
      "filterwarnings",
      r"ignore:label\(\) is deprecated:DeprecationWarning:tensorflow_datasets")
