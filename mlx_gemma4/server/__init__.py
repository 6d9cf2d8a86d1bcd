"""`gemma4 serve`: an OpenAI-compatible HTTP server over the continuous-batching engine."""

from .app import ServerSettings, create_app
from .distributed import follow
from .messages import MediaPolicy
from .run import serve

__all__ = ["MediaPolicy", "ServerSettings", "create_app", "follow", "serve"]
