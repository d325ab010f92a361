"""The error `eqzoo.hf` raises for checkpoints it cannot read or write."""

from .._errors import EqzooError


class HFFormatError(EqzooError, ValueError):
    """A Hugging Face checkpoint folder or config that eqzoo cannot load (or a model it cannot
    export).

    Raised for: a missing `config.json` or `model.safetensors`; an unsupported `architectures` /
    `model_type` or config option; a missing, unexpected or wrongly shaped tensor (the message
    names it, with the expected and the found shape); pickle-based checkpoints (`.bin`, `.pt`),
    which are refused because loading them runs arbitrary code.
    """
