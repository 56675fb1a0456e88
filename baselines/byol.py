"""BYOL (Grill et al., NeurIPS 2020, "Bootstrap Your Own Latent"), the self-supervised baseline RELA is
measured against, and the reference method of the self-supervised protocols (its full-budget cost is
their compute fraction's denominator).

Online backbone -> projector -> predictor learns to predict, from one augmented view, the target
network's projection of another view; the target is an EMA of the online network and gets no
gradient. Everything BYOL shares with RELA (the networks, the symmetric loss, the EMA with its fixed
or cosine momentum, the `budget` of fresh random subsets per epoch) is in benchmarks/kit/ssl.py, with
the decisions and the official code's settings (LINs-lab/ReLA: momentum 0.99, projector
feat -> 2 feat -> 256, predictor 256 -> 2 feat -> 256) in its docstring.

Use: `python -m benchmarks run --protocol ssl-fashion --method byol --param budget=0.2`.
"""

from benchmarks.api import register
from benchmarks.kit.ssl import BYOLMethod


@register("byol")
class BYOL(BYOLMethod):
    """BYOL on a fresh random `budget` share of the data each epoch; EMA target (fixed or cosine momentum)."""
