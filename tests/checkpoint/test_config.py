"""Model configs to JSON and back: every preset, nested dataclasses, tuples, and the errors."""

import dataclasses
import json

import pytest

from eqzoo import checkpoint, models
from eqzoo.nn import RopeScaling


@pytest.mark.parametrize("preset", models.list_presets())
def test_every_preset_round_trips_through_json(preset):
    config = models.get_config(preset)
    data = json.loads(json.dumps(checkpoint.config_to_dict(config)))
    back = checkpoint.config_from_dict(data)
    assert back == config and type(back) is type(config)
    hash(back)  # still hashable (tuples came back as tuples)


def test_nested_dataclass_has_its_own_type_tag():
    config = models.get_config("llama-1b")
    data = checkpoint.config_to_dict(config)
    assert data["__dataclass__"] == "eqzoo.models._llama:LlamaConfig"
    assert data["fields"]["rope_scaling"]["__dataclass__"] == "eqzoo.nn._rope:RopeScaling"
    assert isinstance(checkpoint.config_from_dict(data).rope_scaling, RopeScaling)


@dataclasses.dataclass(frozen=True)
class Custom:
    sizes: tuple = (1, 2)
    scale: float = float("inf")
    extra: dict = dataclasses.field(default_factory=lambda: {"a": [1, None]})


def test_user_dataclass_with_tuples_and_non_finite_floats():
    data = json.loads(json.dumps(checkpoint.config_to_dict(Custom()), allow_nan=False))
    assert checkpoint.config_from_dict(data) == Custom()


def test_errors():
    @dataclasses.dataclass
    class Bad:
        fn: object = print

    with pytest.raises(checkpoint.CheckpointError, match=r"cannot store config.fn = <built-in function print> \(a builtin_function_or_method\) as JSON"):
        checkpoint.config_to_dict(Bad())
    with pytest.raises(checkpoint.CheckpointError, match="module 'not_imported_pkg.mod' is not imported; import it before restoring"):
        checkpoint.config_from_dict({"__dataclass__": "not_imported_pkg.mod:Config", "fields": {}})
    with pytest.raises(checkpoint.CheckpointError, match="malformed config type tag 'nocolon'"):
        checkpoint.config_from_dict({"__dataclass__": "nocolon"})
    with pytest.raises(checkpoint.CheckpointError, match="config type json:dumps is not a dataclass"):
        checkpoint.config_from_dict({"__dataclass__": "json:dumps", "fields": {}})


def test_unrebuildable_config_in_metadata_warns_and_stays_a_dict():
    from eqzoo.checkpoint._config import decode_config

    data = {"__dataclass__": "gone.module:Config", "fields": {"x": 1}}
    with pytest.warns(UserWarning, match="could not rebuild the checkpoint's config .*; returning its dict form"):
        assert decode_config(data) == data
