"""The error `eqzoo.sharding` raises for meshes, rules and layouts that cannot work."""

from .._errors import ConfigError


class ShardingError(ConfigError):
    """A mesh, a sharding rule or a layout is invalid: an unknown mesh axis, mesh sizes that do
    not match the devices, or a parameter dimension that its mesh axis does not divide."""
