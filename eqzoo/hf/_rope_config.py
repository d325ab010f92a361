"""Rotary-embedding settings in a `config.json`: reading and writing `rope_theta`,
`rope_scaling` (transformers 4) and `rope_parameters` (transformers 5)."""

from collections.abc import Mapping
from typing import Any

from ..models import GemmaConfig, LlamaConfig, MixtralConfig
from ..nn import RopeScaling
from ._config_values import _float, _int, _unsupported
from ._errors import HFFormatError


def _check_partial_rotary(d: Mapping[str, Any], merged: Mapping[str, Any], rope_type: str) -> None:
    # `partial_rotary_factor` (in the rotary parameters, or else at the top level, as transformers
    # takes it) asks to rotate only the first fraction of each head; eqzoo rotates the whole head.
    factor = merged.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if factor is None or factor == 1:
        return
    factor = _float({"partial_rotary_factor": factor}, "partial_rotary_factor")
    if rope_type == "default":
        # Accepted: for every family read here, transformers 5's default rotary embedding is the
        # model's own `compute_default_rope_parameters`, which never reads the factor and
        # rotates the whole head, as eqzoo does (the logits agree; tests/hf/test_load.py).
        return
    # transformers' linear and llama3 rotary functions do read it and compute frequencies for the
    # first fraction of the head only; these models' attention then applies them to the whole
    # head and fails at the first forward pass. Refused: rotating the whole head would compute
    # something the file does not describe.
    raise _unsupported(
        d, "partial_rotary_factor", factor,
        f"with rope_type {rope_type!r} transformers rotates only that fraction of each head (and "
        "this architecture's attention cannot apply it), while eqzoo rotates the whole head. Only "
        "partial_rotary_factor=1.0 (or any value with rope_type 'default', which transformers ignores "
        "for this architecture) is supported",
    )


def _rope_from_hf(d: Mapping[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (holding rope_theta); 4.x wrote `rope_theta` and
    # `rope_scaling` (with "type" in the oldest files, "rope_type" later).
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    if params and scaling:
        # transformers 5 reads a non-empty `rope_scaling` *instead of* `rope_parameters`
        # (`rope_scaling or rope_parameters`), its theta then from `rope_scaling` or the top-level
        # `rope_theta`. eqzoo's exports write both, meaning the same rotation; a file where they
        # differ (a `rope_scaling` added by hand to a transformers 5 config) is ambiguous.
        as_scaling = _rope_read(d, {}, scaling, default_theta)
        as_params = _rope_read(d, params, {}, default_theta)
        if as_scaling != as_params:
            raise HFFormatError(
                f"config.json has rope_scaling={d['rope_scaling']!r} and rope_parameters={d['rope_parameters']!r}, "
                f"which describe different rotary embeddings (theta {as_scaling[0]:g}, {as_scaling[1]} against "
                f"theta {as_params[0]:g}, {as_params[1]}). transformers 5 reads rope_scaling and ignores "
                "rope_parameters (including its rope_theta); transformers 4 reads rope_scaling and rope_theta. "
                "Keep the one you mean: put the scaling (and rope_theta) in rope_parameters and delete "
                "rope_scaling, or delete rope_parameters."
            )
    return _rope_read(d, params, scaling, default_theta)


def _rope_read(
    d: Mapping[str, Any], params: Mapping[str, Any], scaling: Mapping[str, Any], default_theta: float
) -> tuple[float, RopeScaling | None]:
    theta = params.get("rope_theta", scaling.get("rope_theta", d.get("rope_theta", default_theta)))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    _check_partial_rotary(d, merged, rope_type)
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        if "factor" not in merged:
            raise HFFormatError("config.json's linear rope scaling lacks 'factor'.")
        return float(theta), RopeScaling(factor=_float(merged, "factor"), rope_type="linear")
    if rope_type != "llama3":
        raise _unsupported(
            d, "rope_type", rope_type, "only 'default', 'linear' and 'llama3' rotary embeddings are implemented"
        )
    try:
        scaling_obj = RopeScaling(
            factor=_float(merged, "factor"),
            low_freq_factor=_float(merged, "low_freq_factor"),
            high_freq_factor=_float(merged, "high_freq_factor"),
            original_max_position_embeddings=_int(merged, "original_max_position_embeddings"),
        )
    except KeyError as err:
        raise HFFormatError(f"config.json's llama3 rope scaling lacks {err.args[0]!r}.") from None
    return float(theta), scaling_obj


def _rope_to_hf(c: LlamaConfig | MixtralConfig | GemmaConfig) -> dict[str, Any]:
    scaling = None
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None and c.rope_scaling.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": c.rope_scaling.factor}
        rope_parameters = {**scaling, "rope_theta": c.rope_theta}
    elif c.rope_scaling is not None:
        scaling = {
            "rope_type": "llama3",
            "factor": c.rope_scaling.factor,
            "low_freq_factor": c.rope_scaling.low_freq_factor,
            "high_freq_factor": c.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings,
        }
        rope_parameters = {**scaling, "rope_theta": c.rope_theta}
    return {"rope_theta": c.rope_theta, "rope_scaling": scaling, "rope_parameters": rope_parameters}
