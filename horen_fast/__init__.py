"""horen-fast: HoReN model editing (normalized Hopfield retrieval over a codebook), fast."""
from .retrieval import RetrievalResult, available_backends, final_scores, retrieve
from .codebook import Codebook
from .config import HoReNConfig
from .editor import EditResult, HoReNEditor

__version__ = "0.1.0"
__all__ = ["retrieve", "final_scores", "RetrievalResult", "available_backends", "Codebook", "HoReNConfig",
           "HoReNEditor", "EditResult", "__version__"]
