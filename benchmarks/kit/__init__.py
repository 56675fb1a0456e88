"""Machinery that methods share: proxy training and its cache, scoring passes, subsets, online scoring,
self-supervised pieces, priors, per-example gradients and ghost products."""
