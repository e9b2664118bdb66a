"""The exception types that mean "the user asked for something that cannot be done":
the CLI prints their message and exits non-zero instead of a traceback."""

from __future__ import annotations

from edgeheads.headnode.loading import ModelLoadError
from edgeheads.headnode.model_cache import ModelFetchError
from edgeheads.headnode.slicing import UnsupportedModelError
from edgeheads.worker.blocks.base import BlockShapeError
from edgeheads.common.config import ConfigError



class StartupError(RuntimeError):
    """The head node cannot start serving: no placement fits, no workers came, ..."""


USER_ERRORS: tuple[type[Exception], ...] = (ModelLoadError, ModelFetchError, UnsupportedModelError, BlockShapeError,
                                            ConfigError, StartupError, ValueError, OSError)  # OSError: cannot listen
