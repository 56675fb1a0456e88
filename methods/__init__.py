"""Data-efficiency methods, one module each; importing the package registers them."""

from . import aum, ccs, forgetting, greats, infobatch, jtt, rela, rho_loss, scores  # noqa: F401
