"""XLA flags for GPU training that eqzoo sets only where the user has not set them."""

import importlib.util
import os
import shlex
import sys
import warnings

from .._errors import ConfigError

# eqzoo's GPU defaults: flag name (no leading `--`) -> value. Only flags that are safe on one GPU
# and on many belong here. Other candidates -- `xla_gpu_enable_triton_gemm=false`,
# `xla_gpu_enable_while_loop_double_buffering=true`, `xla_gpu_enable_command_buffer=...` -- are
# measured by `benchmarks/gpu_suite.py` first and join this dict only if they win there.
GPU_XLA_FLAGS: dict[str, str] = {
    # Lets XLA overlap collectives with compute on sharded runs; harmless on one GPU.
    # Recommended by NVIDIA's JAX-Toolbox images and JAX's GPU performance tips.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
}
"""eqzoo's default XLA flags for GPU training: flag name (without the leading `--`) -> value.

`import eqzoo` appends each one to `XLA_FLAGS` unless the user has already set it; see
`apply_xla_flags`. Currently `xla_gpu_enable_latency_hiding_scheduler=true`, which lets XLA
overlap collectives with compute on sharded runs and is harmless on one GPU.
"""

# Eager initialisation runs each random draw and each scaling as its own small program. Compiled
# together, XLA's algebraic simplifier folds `jax.random.normal`'s sqrt(2) into the initialiser's
# standard deviation, which rounds differently: about a quarter of the normal-drawn weights move
# by one unit in the last place. Without that pass a whole build computes what the eager ops do,
# bit for bit (checked for every small preset by tests/models/test_presets_contract.py, sharded
# by tests/sharding/test_init.py).
EAGER_EXACT_OPTIONS: dict[str, str] = {"xla_disable_hlo_passes": "algsimp"}
"""The `compiler_options` of the compiled model builds (`eqzoo.models.create`,
`eqzoo.sharding.sharded_init`): their arrays equal those built eagerly, op by op."""

# Modules a CUDA build of JAX installs: the `jax-cudaNN-plugin` / `jax-cudaNN-pjrt` wheels that
# `jax[cuda12]` / `jax[cuda13]` pull in, and the older `jaxlib.cuda` layout. The same names JAX
# itself probes (jax/_src/lib/__init__.py, jax/experimental/mosaic/gpu). Looked up, never imported.
_CUDA_PLUGIN_MODULES = (
    "jax_cuda13_plugin",
    "jax_cuda12_plugin",
    "jax_plugins.xla_cuda13",
    "jax_plugins.xla_cuda12",
    "jaxlib.cuda",
)
_PLATFORMS = ("auto", "gpu", "cpu")
_OPT_OUT = "EQZOO_XLA_FLAGS"
_applied: list[str] = []


def _cuda_plugin_installed() -> bool:
    for name in _CUDA_PLUGIN_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):  # a missing parent package, or a broken install
            continue
    return False


def _backend_initialised() -> bool:
    # XLA reads XLA_FLAGS once, when the first backend is created. If JAX has not been imported
    # there is no backend; otherwise ask JAX's (private) bridge, and assume "no" if it moved.
    bridge = sys.modules.get("jax._src.xla_bridge")
    check = getattr(bridge, "backends_are_initialized", None)
    if check is None:
        return bool(getattr(bridge, "_backends", None))
    try:
        return bool(check())
    except Exception:
        return False


def _flag_names(xla_flags: str) -> set[str]:
    """Names in an XLA_FLAGS string: `--name=value` and the bare boolean `--name`."""
    try:
        tokens = shlex.split(xla_flags)  # XLA accepts quoted values: --xla_dump_to="a b"
    except ValueError:
        tokens = xla_flags.split()
    return {t.lstrip("-").split("=", 1)[0] for t in tokens if t.startswith("-")}


def apply_xla_flags(flags: dict[str, str] | None = None, *, platform: str = "auto") -> list[str]:
    """Appends XLA flags to `os.environ["XLA_FLAGS"]`, skipping any the user has already set.

    A flag the user put in `XLA_FLAGS` (as `--name=value` or bare `--name`) is never overridden
    or repeated. XLA reads `XLA_FLAGS` once, when JAX creates its first backend (the first JAX
    computation); if that has already happened nothing is changed and a warning says how to set
    the flags instead. `import eqzoo` calls this once with the defaults; set the environment
    variable `EQZOO_XLA_FLAGS=0` to opt out.

    **Arguments:**

    - `flags`: flag name (without the leading `--`) -> value. Defaults to `GPU_XLA_FLAGS`.
    - `platform`: `"auto"` applies the flags only if a CUDA plugin for JAX is installed (looked
        up without importing it); `"gpu"` applies them regardless; `"cpu"` does nothing.

    **Returns:**

    The `--name=value` strings that were appended, in order; `[]` if none were.
    """
    if platform not in _PLATFORMS:
        raise ConfigError(
            f"apply_xla_flags got platform={platform!r}; expected one of {_PLATFORMS}. Use "
            "'gpu' to apply the flags even where no CUDA plugin is found."
        )
    if os.environ.get(_OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return []
    if platform == "cpu" or (platform == "auto" and not _cuda_plugin_installed()):
        return []
    flags = GPU_XLA_FLAGS if flags is None else flags
    existing = os.environ.get("XLA_FLAGS", "")
    present = _flag_names(existing)
    added = [
        f"--{name.lstrip('-')}={value}"
        for name, value in flags.items()
        if name.lstrip("-") not in present
    ]
    if not added:
        return []
    if _backend_initialised():
        line = " ".join([existing.strip(), *added]).strip()
        warnings.warn(
            f"eqzoo did not set the XLA flags {added}: JAX has already created its backend, and "
            "XLA flags can only take effect before the first JAX computation. Call "
            "`eqzoo.perf.apply_xla_flags()` earlier (or import eqzoo first), or set them in the "
            f"environment before starting Python:\n    export XLA_FLAGS='{line}'",
            stacklevel=2,
        )
        return []
    os.environ["XLA_FLAGS"] = " ".join([existing.strip(), *added]).strip()
    _applied.extend(added)
    return added


def applied_xla_flags() -> list[str]:
    """The XLA flags eqzoo has added to `XLA_FLAGS` in this process so far.

    **Returns:**

    A new list of `--name=value` strings, in the order they were added.
    """
    return list(_applied)
