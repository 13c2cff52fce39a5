"""horen-fast: HoReN model editing (normalized Hopfield retrieval over a codebook), fast.

HoReN (arXiv 2605.08143) wraps one MLP output projection of a causal LM (e.g. layer 15's
``mlp.down_proj`` in SmolLM2-135M); the base weights never change. A codebook holds one entry per
edit: a unit-norm key and a learned value vector (width: the model's hidden size).

- The query of a prompt is (by default) the wrapped layer's input averaged over the last 60% of
  the prompt's tokens, normalized to unit length (q = x / ||x||).
- Retrieval refines q by one damped Hopfield step on the unit sphere: with scores
  s = beta * K q over all keys K, r = normalize(softmax(s)^T K) and
  q' = normalize((1 - alpha) q + alpha r) (beta 20, alpha 0.1 by default; no step is taken when
  ||r - q|| < eps). The best key is the one with the highest final cosine k . q'; it matches when
  that cosine exceeds the threshold tau (0.85 by default). Ties go to the first key in storage
  order.
- A matched entry's value is added to the layer's output at the prompt's last token; with no
  match the output is bit-for-bit the original.
- An edit (prompt, target) stores the prompt's query as a new key (or reuses / replaces the entry
  it matches) and trains only that entry's value so that the model generates the target.

``retrieve`` / ``final_scores`` compute retrieval on any backend (torch, C++, Triton),
``Codebook`` stores entries, ``HoReNEditor`` attaches HoReN to a Hugging Face model, and the
``horen-fast`` command runs the demo, evaluations and threshold calibration.
"""
__version__ = "0.1.0"

from .dispatch import NotSupportedError
from .retrieval import RetrievalResult, available_backends, final_scores, retrieve
from .prefilter import PrefilterConfig
from .codebook import Codebook
from .config import HoReNConfig
from .editor import EditResult, HoReNEditor
from . import hparams

__all__ = ["retrieve", "final_scores", "RetrievalResult", "available_backends", "NotSupportedError",
           "Codebook", "PrefilterConfig", "HoReNConfig", "HoReNEditor", "EditResult", "hparams",
           "__version__"]
