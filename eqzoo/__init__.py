"""eqzoo: an Equinox-native model zoo and training library for JAX."""

__version__ = "0.1.0"
