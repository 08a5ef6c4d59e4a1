"""Typed errors. Each message names the offending field or input and says how to fix it."""


class SignLockError(Exception):
    """Base class of every error raised by hf_signlock."""


class SignLockConfigError(SignLockError, ValueError):
    """A setting (argument, recipe key, dataclass field) has a bad value."""


class TargetNotFoundError(SignLockConfigError):
    """A target-module pattern matches no module of the model."""


class RecipeError(SignLockConfigError):
    """A YAML recipe cannot be read: unknown keys, wrong types or a missing file."""


class DataError(SignLockError, ValueError):
    """A dataset named by a recipe cannot be found or read."""


class NonFiniteLossError(SignLockError, FloatingPointError):
    """Training produced a NaN or infinite loss."""


class MissingDependencyError(SignLockError, ImportError):
    """An optional dependency (an extra of hf-signlock) is not installed; the message names the pip command."""


class CorruptCheckpointError(SignLockError, ValueError):
    """Stored data (a flip stream, a tensor, a checksum) does not decode exactly; nothing is loaded."""


class ModelLoadError(SignLockError, OSError):
    """A model argument (local folder or Hub id) names nothing loadable: no config, no weights, another shape."""


class BudgetError(SignLockConfigError):
    """A bits-per-weight budget that the signs, the codec's tables and the layer records cannot fit in."""


class BaseModelError(SignLockError, ValueError):
    """The base model an export's signs are stored against (``sign_source="base"``) cannot give those signs."""


class BaseModelNotFoundError(BaseModelError):
    """The base model (local folder or Hub id, at its revision) is missing, or holds neither a sign pack nor
    safetensors weights."""


class BaseArchitectureError(BaseModelError):
    """The base model's target weights have other names or shapes than the checkpoint's."""


class BaseSignsMismatchError(BaseModelError):
    """The base model's signs are not those the checkpoint was exported against (their checksum differs)."""


class HubUnreachableError(SignLockError, ConnectionError):
    """The Hugging Face Hub cannot be reached: offline mode (``HF_HUB_OFFLINE=1``), no network, a refused
    connection or a timeout. The message names the Hub address and what to do; nothing was uploaded."""
