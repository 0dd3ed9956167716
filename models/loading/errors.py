"""Load-time failures. Every message names the file (and tensor, where there is one)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: bad architecture, quant type, shape, or a missing tensor."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path (or the weight files a config points at) does not exist."""
