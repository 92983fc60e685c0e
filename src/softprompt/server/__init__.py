"""An OpenAI-compatible HTTP server for one export and its bank (`serve-model`): every task is a model id, and
requests for different tasks share batches."""

from .app import create_app
from .protocol import Limits

__all__ = ["Limits", "create_app"]
