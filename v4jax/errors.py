"""The errors a user's input can cause: one base class, so the command line can turn any of
them into a one-line message and an exit code, and a traceback means a bug in v4jax."""


class V4jaxError(ValueError):
    """Input that v4jax cannot use; the message names the file, tensor, key, row or argument."""


class ConfigError(V4jaxError):
    """A config file or value that v4jax cannot run."""


class CheckpointError(V4jaxError):
    """A checkpoint that cannot be read, converted or written; the message names file and tensor."""


class DataError(V4jaxError):
    """A data file, record or token id that cannot be used; the message names file:line or the prompt."""


class MeshError(V4jaxError):
    """A mesh spec that cannot be built on the available devices."""


class ShardingError(V4jaxError):
    """A rule set that cannot place a tensor on a mesh."""
