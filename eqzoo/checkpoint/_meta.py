"""A step's JSON metadata: what it holds, how it is checked, and how a target is checked
against it."""

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ..train import TrainState
from ._config import config_from_dict, config_to_dict, decode_config
from ._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointVersionError,
    list_items,
)
from ._integrity import crc_ok, with_crc
from ._tree import spec_str

FORMAT_VERSION = 1
"""The checkpoint format this eqzoo writes (stored in every step's metadata). Steps written in
a newer format are refused with `CheckpointVersionError`."""

_FORMAT = "eqzoo.checkpoint"


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a step's JSON metadata holds.

    **Attributes:** `step`; `format_version`; `eqzoo_version` (that wrote it); `config` (the
    model config, rebuilt as its dataclass, or `None`); `data_state` (the loader's `state_dict()`,
    or `None`); `metadata` (the user dict passed to `save`); `arrays` (`{name: {"shape",
    "dtype"}}` for every stored array); `run` (what [`eqzoo.train.fit`][] recorded of the run
    that saved it: `num_steps`, the batch shapes, your `run_config`, and `hyperparams`, the
    `optax.inject_hyperparams` values it started from, where its optimizer has any; `None` for a
    save outside `fit` or one written by an older eqzoo); `optimizer` (the types of its optax
    optimizer state and how they nest, `(ScaleByAdamState, EmptyState, EmptyState)` for
    `optax.adamw`, compared with the restore target's; `None` for a step written by an older
    eqzoo).
    """

    step: int
    format_version: int
    eqzoo_version: str
    config: Any
    data_state: Any
    metadata: dict[str, Any]
    arrays: dict[str, dict[str, Any]]
    run: dict[str, Any] | None = None
    optimizer: str | None = None


class Restored(NamedTuple):
    """What [`eqzoo.checkpoint.Checkpointer.restore`][] returns: `state, data_state, meta`."""

    state: TrainState
    data_state: Any
    meta: CheckpointMeta


def build_meta(
    *,
    step: int,
    arrays: dict[str, dict[str, Any]],
    config: Any,
    data_state: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    statics: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
    optimizer: str | None = None,
) -> dict[str, Any]:
    """The JSON metadata of a step, with its CRC-32; raises if something is not JSON-able."""
    from .. import __version__

    meta = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "eqzoo_version": __version__,
        "step": step,
        "config": None if config is None else config_to_dict(config),
        "data_state": None if data_state is None else dict(data_state),
        "metadata": dict(metadata or {}),
        "arrays": arrays,
    }
    if statics is not None:
        meta["statics"] = dict(statics)
    if run is not None:
        meta["run"] = dict(run)
    if optimizer is not None:
        meta["optimizer"] = optimizer
    try:
        meta = json.loads(json.dumps(meta))  # exactly what a reader will see
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint metadata must be JSON-able (data_state, metadata, config, fit's run_config): {err}") from err
    return with_crc(meta)


def validate_meta(meta: Any, *, step: int, where: str, path: Path) -> dict[str, Any]:
    """Check that `meta` is eqzoo metadata in a format this eqzoo reads, unaltered."""
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointCorruptError(
            f"{where}: {path} is not eqzoo checkpoint metadata.", step=step, parameters=("<metadata>",)
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{where} was written in eqzoo checkpoint format {version!r} (by eqzoo "
            f"{meta.get('eqzoo_version')}); this eqzoo reads formats up to {FORMAT_VERSION}. "
            "Upgrade eqzoo to restore it."
        )
    if not crc_ok(meta):
        raise CheckpointCorruptError(
            f"{where}: its metadata ({path}) fails its CRC-32 check; the file was altered after it "
            "was written.",
            step=step, parameters=("<metadata>",),
        )
    return meta


def meta_object(meta: dict[str, Any]) -> CheckpointMeta:
    """The validated metadata dict as a `CheckpointMeta` (the config rebuilt when possible)."""
    return CheckpointMeta(
        step=int(meta["step"]),
        format_version=int(meta["format_version"]),
        eqzoo_version=str(meta.get("eqzoo_version")),
        config=None if meta.get("config") is None else decode_config(meta["config"]),
        data_state=meta.get("data_state"),
        metadata=meta.get("metadata") or {},
        arrays=meta["arrays"],
        run=meta.get("run"),
        optimizer=meta.get("optimizer"),
    )


RESTORE_MAY_CHANGE: frozenset[str] = frozenset({
    "remat", "scan_layers", "attention_backend", "moe_implementation", "moe_capacity_factor", "max_seq",
    "router_aux_loss_coef", "router_z_loss_coef",
})
"""Model config fields that may differ between a saved run and its restore target: how the model
runs (rematerialisation, scan or unrolled layers, attention kernel, mixture-of-experts
dispatch and capacity), the longest sequence (its arrays, where it has any, are checked by
shape), and the router losses' weights. Any other field that differs changes what the stored
weights mean, and [`eqzoo.checkpoint.Checkpointer.restore`][] refuses it."""


def config_differences(saved: Any, target: Any, sides: tuple[str, str] = ("saved", "target")) -> list[str]:
    """`"field: saved X, target Y"` (the two words are `sides`) for each field in which the config `target` differs from the
    stored JSON form `saved` ([`eqzoo.checkpoint.config_to_dict`][]'s), except those in
    `RESTORE_MAY_CHANGE`. Empty when either is `None`, not a stored config, or of another class
    than `target` (a config of the caller's own, stored with `save(..., config=...)`: the
    arrays' names and shapes are still checked). The saved form is rebuilt first where it can
    be, so a field added to the class since it was written takes its default rather than
    counting as a difference."""
    if saved is None or target is None:
        return []
    mine = config_to_dict(target)
    if not (isinstance(saved, dict) and isinstance(mine, dict) and "fields" in saved and "fields" in mine):
        return []
    if saved.get("__dataclass__") != mine.get("__dataclass__"):
        return []
    try:
        saved = config_to_dict(config_from_dict(saved))  # defaults for fields it predates
    except Exception:  # a class this eqzoo cannot rebuild it as: compare the stored form
        pass
    differ = []
    for name in sorted(set(saved["fields"]) | set(mine["fields"])):
        a, b = saved["fields"].get(name, "<absent>"), mine["fields"].get(name, "<absent>")
        if name not in RESTORE_MAY_CHANGE and a != b:
            differ.append(f"{name}: {sides[0]} {_shown(a)}, {sides[1]} {_shown(b)}")
    return differ


def check_config(saved: Any, target: Any, *, where: str) -> None:
    """Raise `CheckpointMismatchError` listing the config fields in which the target's model
    config (`target`, a config object) differs from the saved one (`saved`, its stored JSON
    form), other than those in `RESTORE_MAY_CHANGE`. Nothing to compare when either is `None`."""
    differ = config_differences(saved, target)
    if differ:
        raise CheckpointMismatchError(
            f"{where} was saved from a model config that differs from the restore target's in "
            f"{len(differ)} field(s), which changes what the stored weights mean even where every "
            "shape fits:\n" + list_items(differ)
            + "\nBuild the target from the saved config (Checkpointer.meta(step).config), or pass "
            "allow_config_change=True to restore into the other config on purpose."
        )


def check_model_class(saved: Any, target: Any, *, where: str) -> None:
    """Raise `CheckpointMismatchError` when the saved model config and the target's are both
    eqzoo model configs of different classes (another architecture: a Llama checkpoint restored
    into a GPT-2), before the arrays are compared path by path. A config of the caller's own
    (another module) is left to the arrays' check."""
    if saved is None or target is None or not isinstance(saved, dict):
        return
    mine = config_to_dict(target)
    tags = saved.get("__dataclass__"), mine.get("__dataclass__") if isinstance(mine, dict) else None
    if not all(isinstance(t, str) and t.startswith("eqzoo.") for t in tags) or tags[0] == tags[1]:
        return
    names = [t.rsplit(":", 1)[-1] for t in tags]
    raise CheckpointMismatchError(
        f"{where} holds a {names[0]} model, but the restore target is a {names[1]} model: another "
        f"architecture, whose weights cannot be restored into it. Build the target from the saved "
        f"config (abstract_state(Checkpointer.meta(step).config, optimizer)), or use another "
        f"directory for the new model."
    )


def _shown(value: Any) -> str:
    try:
        return repr(config_from_dict(value))
    except Exception:  # an encoded form this eqzoo cannot rebuild: show it as stored
        return repr(value)


def renamed_codes(expected: Mapping[str, Any], found: Mapping[str, Any]) -> dict[str, str]:
    """`{target name: stored name}` for the int8 codes of `eqzoo.quant.QuantizedLinear` layers
    written before the field was renamed from `weight` to `codes` (`...q_proj.weight` in the
    file, `...q_proj.codes` in the target), so that such files and steps restore unchanged.

    Both arguments map a name to `{"shape": [...], "dtype": "..."}`. A name is mapped only when
    the target's `<prefix>.codes` is int8 and missing from the file, and the file holds an int8
    `<prefix>.weight` of the same shape (which the target lacks) beside `<prefix>.scale`: the
    old layout of one layer, nothing else."""
    out = {}
    for name, spec in expected.items():
        if not name.endswith(".codes") or name in found or spec["dtype"] != "int8":
            continue
        prefix = name[: -len("codes")]
        old = found.get(prefix + "weight")
        if (
            old is not None
            and prefix + "weight" not in expected
            and prefix + "scale" in found
            and old["dtype"] == "int8"
            and list(old["shape"]) == list(spec["shape"])
        ):
            out[name] = prefix + "weight"
    return out


def _quant_layout(codes: Mapping[str, Any], scale: Mapping[str, Any] | None) -> tuple[int, int | None] | None:
    """`(bits, group_size)` of an `eqzoo.quant` layer from its codes' and scale's shapes and
    dtypes, or `None` when they are not such a pair. Linear layers hold codes `(*lead, out, in')`
    and experts `(*lead, contract', out)` (`'`: halved when int4 codes are packed two to a
    byte); both hold scales `(*lead, out)` per channel or `(*lead, out, groups)` with groups."""
    bits = {"uint8": 4, "int8": 8}.get(codes["dtype"])
    if bits is None or scale is None:
        return None
    cs, ss = list(codes["shape"]), list(scale["shape"])
    if len(ss) == len(cs) - 1:
        return bits, None
    if len(ss) != len(cs) or not ss[-1] or len(cs) < 2:
        return None
    packed = cs[-1] if ss[:-1] == cs[:-1] else cs[-2]  # a linear layer's inputs, else an expert's contracted rows
    return bits, packed * (8 // bits) // ss[-1]


def _layout_str(layout: tuple[int, int | None]) -> str:
    bits, group_size = layout
    codes = "int4 codes (uint8, packed two to a byte)" if bits == 4 else "int8 codes"
    return codes + (" with one scale per output channel" if group_size is None else f" with groups of {group_size}")


def quant_hint(expected: Mapping[str, Any], found: Mapping[str, Any], what: str) -> str:
    """A line naming the cause when the arrays that do not fit are `eqzoo.quant` layers: the
    `what` (checkpoint, file) holds quantized layers and the target float ones, or the reverse,
    or both are quantized with other `bits` / `group_size` (whose shapes and dtypes differ, an
    error that otherwise names no cause). Both arguments map a name to `{"shape", "dtype"}`;
    empty when nothing applies."""

    def layouts(arrays):
        return {
            n[: -len("codes")]: _quant_layout(arrays[n], arrays.get(n[: -len("codes")] + "scale"))
            for n in arrays if n.endswith(".codes")
        }

    saved, target = layouts(found), layouts(expected)
    differ = [(p, saved[p], target[p]) for p in target if p in saved and saved[p] and target[p] and saved[p] != target[p]]
    if differ:
        (prefix, theirs, ours), more = differ[0], len(differ) - 1
        bits, group_size = theirs
        return (
            f"\nThe {what} holds {'int4' if bits == 4 else 'int8'} layers quantized otherwise than the target's: "
            f"{prefix.rstrip('.')} holds {_layout_str(theirs)}, the target {_layout_str(ours)}"
            + (f" ({more} more layer(s) alike)" if more else "")
            + f". Build the target with eqzoo.quant.quantize(..., bits={bits}, group_size={group_size}), as the "
            "saved model was (prepare_qat takes the same bits and group_size)."
        )
    known = [layout for layout in saved.values() if layout]
    if saved and not target:
        bits, group_size = known[0] if known else (8, None)
        args = "" if (bits, group_size) == (8, None) else f", bits={bits}, group_size={group_size}"
        example = (  # a training checkpoint's target is a state; a weights file's, a model
            f"abstract_state(lambda k: eqzoo.quant.quantize(eqzoo.models.create(config, key=k){args}), optimizer)"
            if what == "checkpoint" else
            "load_weights(equinox.filter_eval_shape(lambda: eqzoo.quant.quantize(eqzoo.models.create(config, "
            f"key=jax.random.key(0)){args})), path)"
        )
        return (
            f"\nThe {what} holds int{bits} layers (`codes` and `scale`, from eqzoo.quant.quantize) and the "
            f"target does not: quantize the target the same way, e.g. {example}."
        )
    if target and not saved:
        bits = next((layout[0] for layout in target.values() if layout), 8)
        return (
            f"\nThe target has int{bits} layers (eqzoo.quant) and the {what} does not: restore the "
            "float model, then quantize it."
        )
    return ""


def lora_hint(expected: Mapping[str, Any], found: Mapping[str, Any], what: str) -> str:
    """A line naming the cause when LoRA factors (`...lora_a`) differ in one axis only, their
    rank: adapters built with another `rank` than the saved ones (a resumed run whose
    `peft.lora(...)` call changed). Both arguments map a name to `{"shape", "dtype"}`; empty
    when nothing applies."""
    def differing(name):
        # the one axis (counted from the end) where the saved and target shapes of `name` differ
        if name not in expected or name not in found:
            return None
        ours, theirs = list(expected[name]["shape"]), list(found[name]["shape"])
        if len(ours) != len(theirs):
            return None
        axes = [i - len(ours) for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
        return (axes[0], theirs[axes[0]], ours[axes[0]]) if len(axes) == 1 else None

    ranks = set()
    for name in expected:
        if not name.endswith(".lora_a"):
            continue
        a, b = differing(name), differing(name[: -len("lora_a")] + "lora_b")
        # The rank is a factor's last or second-to-last axis (`lora_a` (..., rank, in) and
        # `lora_b` (..., out, rank) of a linear layer; (..., in, rank) and (..., rank, out) of
        # an expert weight's): it differs in both, at the other's axis. A deeper stack or a
        # wider layer differs elsewhere, or in one factor only, and is not a rank change.
        if a is not None and b is not None and {a[0], b[0]} == {-1, -2} and a[1:] == b[1:]:
            ranks.add(a[1:])
    if not ranks:
        return ""
    saved = sorted({r for r, _ in ranks})
    target = sorted({r for _, r in ranks})
    one = lambda rs: str(rs[0]) if len(rs) == 1 else str(rs)  # noqa: E731
    return (
        f"\nThe LoRA adapters differ in rank: the {what} holds rank {one(saved)}, the target rank {one(target)}. "
        f"Build the target with eqzoo.peft.lora(..., rank={saved[0]}) (and the alpha and targets) as the saved "
        "adapters were; to train at another rank, start new adapters (or merge the saved ones into the base "
        "with eqzoo.peft.merge and adapt that)."
    )


def _optimized(names, params: set[str]) -> set[str]:
    """The parameters (model paths without `model.`) that the `opt_state` entries among `names`
    hold state for: each entry's longest dotted suffix that is a parameter's path."""
    out = set()
    for name in names:
        if name.startswith("opt_state."):
            parts = name.split(".")
            out |= next(({".".join(parts[i:])} for i in range(1, len(parts)) if ".".join(parts[i:]) in params), set())
    return out


def _trainable_hint(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    """A line naming the cause when the target's optimizer holds state for another set of the
    model's parameters than the saved one (both some): a state built with another `trainable`
    filter, as a LoRA run's (`peft.adapter_filter`) restored into `abstract_state(model,
    optimizer)` without it. Empty otherwise (another optimizer: the caller says so)."""
    params = {n[len("model."):] for n in expected if n.startswith("model.")}
    ours, theirs = _optimized(expected, params), _optimized(found, params)
    if not ours or not theirs or ours == theirs:
        return ""
    more, fewer = sorted(ours - theirs), sorted(theirs - ours)
    side = (
        f"the target's optimizer holds state for {len(more)} parameter array(s) the saved run did not train "
        f"({', '.join(more[:3])}{', ...' if len(more) > 3 else ''})" if more else
        f"the saved run trained {len(fewer)} parameter array(s) the target's optimizer leaves out "
        f"({', '.join(fewer[:3])}{', ...' if len(fewer) > 3 else ''})"
    )
    return (
        f"\nThe optimizer states cover other parameters: {side}. Build the target with the saved run's "
        "trainable filter, abstract_state(model, optimizer, trainable=...) or TrainState.create(..., "
        "trainable=...): for LoRA, trainable=eqzoo.peft.adapter_filter(model)."
    )


def check_fit(expected: dict[str, Any], found: dict[str, Any], *, where: str) -> None:
    """Raise `CheckpointMismatchError` listing every array that is missing, unexpected, or has
    another shape or dtype than the target expects."""
    missing = [f"{n}: expected {spec_str(expected[n])}, not in the checkpoint" for n in expected if n not in found]
    extra = [f"{n}: found {spec_str(found[n])}, not in the target" for n in found if n not in expected]
    differ = [
        f"{n}: expected {spec_str(expected[n])}, found {spec_str(found[n])}"
        for n in expected
        if n in found and (list(expected[n]["shape"]) != list(found[n]["shape"]) or expected[n]["dtype"] != found[n]["dtype"])
    ]
    problems = differ + missing + extra
    if problems:
        names = [p.split(":")[0] for p in problems]
        hint = ""
        if all(n.startswith("opt_state") for n in names):
            hint = _trainable_hint(expected, found) or (
                "\nEvery difference is in the optimizer state: build the target with the saved run's "
                "optimizer and Precision (fp16's dynamic loss scale wraps the optimizer state, so a "
                "change to or from fp16 moves every opt_state path)."
            )
        if not missing and not extra and all(list(expected[n]["shape"]) == list(found[n]["shape"]) for n in names):
            hint += (
                "\nOnly dtypes differ: restore does not cast. Restore with the saved run's dtypes "
                "(its Precision's param_dtype), then cast the restored model; for the model alone, "
                "save_weights + load_weights(..., cast=True) converts."
            )
        hint += quant_hint(expected, found, "checkpoint")
        hint += lora_hint(expected, found, "checkpoint")
        raise CheckpointMismatchError(
            f"{where} does not fit the restore target ({len(differ)} with another shape/dtype, "
            f"{len(missing)} missing, {len(extra)} unexpected):\n"
            + list_items(problems)
            + "\nBuild the target from the same model config and optimizer as the saved run "
            "(Checkpointer.meta(step).config holds the saved config)." + hint
        )
