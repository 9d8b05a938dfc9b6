"""The UserError tree: problems a user can cause and fix. The CLI prints the message on one line and exits 2."""


class UserError(Exception):
    """A one-line message that says what is wrong and what to do."""


class DataError(UserError, ValueError):
    """A problem with the user's data or data options."""


class ConfigError(DataError):
    """A setting out of its range or choices (see `options`)."""


class WeightsError(UserError):
    """Pretrained weights could not be had; the message says how to get them."""


class ArtifactError(UserError):
    """A saved model that cannot be loaded: missing, damaged, or from a newer headstart."""


class CheckpointError(UserError):
    """A training checkpoint that cannot be resumed from."""


class FinetuneError(UserError, ValueError):
    """Settings this backbone cannot be fine-tuned with."""


class TrackingError(UserError):
    """A run could not be logged to the tracker asked for (its package missing, its store unreachable)."""
