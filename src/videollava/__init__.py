"""Video-LLaVA: one language model that understands images and videos."""

from videollava.errors import VideoLlavaError

__version__ = "0.1.0"
__all__ = ["VideoLlavaError", "__version__"]
