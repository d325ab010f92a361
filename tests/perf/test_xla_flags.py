"""eqzoo.perf: XLA flags added only where the user has not set them, and only while they can work.

XLA reads XLA_FLAGS once, when JAX creates its first backend. The pytest process has usually done
that already, so every case that must reach "flags appended" runs in a fresh interpreter.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax.numpy as jnp
import pytest

from eqzoo.perf import GPU_XLA_FLAGS, applied_xla_flags, apply_xla_flags
from eqzoo.perf._xla_flags import _cuda_plugin_installed

_NO_CUDA = pytest.mark.skipif(
    _cuda_plugin_installed(), reason="a CUDA plugin for JAX is installed, so 'auto' applies flags"
)
_DEFAULTS = " ".join(f"--{name}={value}" for name, value in GPU_XLA_FLAGS.items())


def _python(code: str, xla_flags: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "EQZOO_XLA_FLAGS")}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _fresh(code: str, xla_flags: str | None = None) -> dict:
    """Runs `code` in a new interpreter; it prints one JSON object as its last line."""
    proc = _python(code, xla_flags)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("EQZOO_XLA_FLAGS", raising=False)
    return monkeypatch


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# ---- never overriding the user --------------------------------------------------------------


def test_user_value_is_kept_and_not_repeated(clean_env):
    user = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_hlo_as_text=true"
    clean_env.setenv("XLA_FLAGS", user)
    assert _no_warnings(apply_xla_flags, platform="gpu") == []
    assert os.environ["XLA_FLAGS"] == user


def test_bare_boolean_flag_counts_as_set(clean_env):
    user = "  --xla_dump_hlo_as_text\t--xla_gpu_enable_latency_hiding_scheduler  "
    clean_env.setenv("XLA_FLAGS", user)
    assert _no_warnings(apply_xla_flags, platform="gpu") == []
    assert os.environ["XLA_FLAGS"] == user


def test_quoted_user_value_is_parsed(clean_env):
    user = '--xla_dump_to="/tmp/a b" --xla_gpu_enable_latency_hiding_scheduler=false'
    clean_env.setenv("XLA_FLAGS", user)
    flags = {"xla_dump_to": "/elsewhere", "xla_gpu_enable_latency_hiding_scheduler": "true"}
    assert _no_warnings(apply_xla_flags, flags, platform="gpu") == []
    assert os.environ["XLA_FLAGS"] == user


def test_missing_flags_are_appended_and_returned():
    user = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_hlo_as_text"
    out = _fresh(
        """
        import json, os
        os.environ["EQZOO_XLA_FLAGS"] = "0"  # keep `import eqzoo` out of it, even on a GPU box
        import eqzoo
        del os.environ["EQZOO_XLA_FLAGS"]
        from eqzoo.perf import apply_xla_flags, applied_xla_flags
        flags = {
            "xla_gpu_enable_latency_hiding_scheduler": "true",
            "xla_dump_hlo_as_text": "false",
            "xla_gpu_enable_triton_gemm": "false",
        }
        first = apply_xla_flags(flags, platform="gpu")
        env_first = os.environ["XLA_FLAGS"]
        second = apply_xla_flags(flags, platform="gpu")
        print(json.dumps(dict(first=first, env_first=env_first,
                              second=second, env=os.environ["XLA_FLAGS"],
                              applied=applied_xla_flags())))
        """,
        xla_flags=user,
    )
    assert out["first"] == ["--xla_gpu_enable_triton_gemm=false"]
    assert out["env_first"] == user + " --xla_gpu_enable_triton_gemm=false"
    assert out["second"] == [] and out["env"] == out["env_first"]
    assert out["applied"] == out["first"]


def test_defaults_are_applied_when_xla_flags_is_unset():
    out = _fresh(
        """
        import json, os
        os.environ["EQZOO_XLA_FLAGS"] = "0"  # keep `import eqzoo` out of it, even on a GPU box
        from eqzoo.perf import apply_xla_flags, applied_xla_flags
        del os.environ["EQZOO_XLA_FLAGS"]
        added = apply_xla_flags(platform="gpu")
        print(json.dumps(dict(added=added, env=os.environ.get("XLA_FLAGS"),
                              applied=applied_xla_flags())))
        """
    )
    assert out["added"] == _DEFAULTS.split()
    assert out["env"] == _DEFAULTS
    assert out["applied"] == out["added"]


def test_opt_out_env_var(clean_env):
    clean_env.setenv("EQZOO_XLA_FLAGS", "0")
    before = applied_xla_flags()
    assert _no_warnings(apply_xla_flags, platform="gpu") == []
    assert "XLA_FLAGS" not in os.environ
    assert applied_xla_flags() == before


# ---- platforms ------------------------------------------------------------------------------


def test_cpu_platform_adds_nothing(clean_env):
    assert _no_warnings(apply_xla_flags, platform="cpu") == []
    assert "XLA_FLAGS" not in os.environ


@_NO_CUDA
def test_auto_adds_nothing_without_a_cuda_plugin(clean_env):
    assert _no_warnings(apply_xla_flags) == []
    assert "XLA_FLAGS" not in os.environ


def test_unknown_platform_is_rejected():
    with pytest.raises(
        ValueError, match=r"platform='tpu'; expected one of \('auto', 'gpu', 'cpu'\)"
    ):
        apply_xla_flags(platform="tpu")


# ---- too late to matter ---------------------------------------------------------------------


def test_warns_and_changes_nothing_after_a_jax_computation(clean_env):
    jnp.zeros(1).block_until_ready()  # creates the backend, if no earlier test did
    before = applied_xla_flags()
    with pytest.warns(
        UserWarning,
        match=r"(?s)can only take effect before the first JAX computation.*export XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true'",
    ):
        assert apply_xla_flags(platform="gpu") == []
    assert "XLA_FLAGS" not in os.environ
    assert applied_xla_flags() == before


# ---- import eqzoo ---------------------------------------------------------------------------


@_NO_CUDA
def test_import_eqzoo_adds_nothing_without_a_cuda_plugin():
    out = _fresh(
        """
        import json, os
        import eqzoo
        from jax._src import xla_bridge
        print(json.dumps(dict(env=os.environ.get("XLA_FLAGS"),
                              applied=eqzoo.perf.applied_xla_flags(),
                              backend=xla_bridge.backends_are_initialized())))
        """
    )
    assert out == {"env": None, "applied": [], "backend": False}


def test_import_eqzoo_keeps_the_users_value():
    user = "--xla_gpu_enable_latency_hiding_scheduler=false"
    out = _fresh(
        """
        import json, os
        import eqzoo
        env_after_import = os.environ["XLA_FLAGS"]
        forced = eqzoo.perf.apply_xla_flags(platform="gpu")  # even forced, the user's value wins
        print(json.dumps(dict(env_after_import=env_after_import, forced=forced,
                              env=os.environ["XLA_FLAGS"], applied=eqzoo.perf.applied_xla_flags())))
        """,
        xla_flags=user,
    )
    assert out == {"env_after_import": user, "forced": [], "env": user, "applied": []}


# ---- the defaults still exist in XLA --------------------------------------------------------

_COMPUTE = "import jax; jax.numpy.zeros(1).block_until_ready()"


def test_default_flags_are_accepted_by_the_installed_xla():
    # XLA aborts on an unknown flag or a bad value, so exit code 0 means every default is real.
    proc = _python(_COMPUTE, xla_flags=_DEFAULTS)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("name", sorted(GPU_XLA_FLAGS))
def test_a_misspelled_flag_would_be_caught(name):
    # The control for the test above: the same run with the name misspelled must fail.
    proc = _python(_COMPUTE, xla_flags=f"--{name}_typo={GPU_XLA_FLAGS[name]}")
    assert proc.returncode != 0
    assert f"Unknown flag in XLA_FLAGS: --{name}_typo" in proc.stderr
