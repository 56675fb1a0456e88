"""spurious-fashion: a CPU-scale Waterbirds analogue built from real Fashion-MNIST images.

Two super-classes of Fashion-MNIST classes (label 0 and 1) are drawn on a coloured background: a
background colour "place" p in {0, 1}, and group = 2 * label + place, as Waterbirds' 2 * y + place.
The background agrees with the label (p == label) for exactly round(correlation * n_c) of the n_c
examples of each label c in the training split, and for round(eval_correlation * n_c) at validation
and test (default 0.5: no correlation, every label seen on both backgrounds). So groups 0 and 3 are
the majority groups of training and groups 1 and 2 its minority, and a model that leans on the
background fails on the minority groups at test.

Decisions:
- Exact counts per label, not a Bernoulli draw per example: the realised correlation equals the
  parameter up to rounding (1/n_c), so a test can check it exactly for any parameters.
- The validation split is carved from Fashion-MNIST's TRAINING images (it has no validation split):
  `n_val` images of the chosen classes, drawn from the data seed before the training images, and
  coloured at `eval_correlation`. It is a protocol-level split like Waterbirds' val (the same for
  every run, with its own group balance), which is what checkpoint selection on validation
  worst-group accuracy needs. The protocol `holdout` mechanism would not do: it is carved per run
  seed from the training split, so it would carry the training correlation and change with the seed.
- The test split is every Fashion-MNIST test image of the chosen classes.
- Colouring composites the grey object over the background with opacity = intensity:
  out = g * (g / 255) + colour * (1 - g / 255) per channel. The background (g = 0) takes the
  colour, bright garment pixels stay grey; no threshold to tune.
- Everything depends only on the data kwargs (seed included), never on the run seed: every method
  and run seed sees the same data, as with a real dataset.
- Nothing is tuned to the defaults: any two disjoint sets of classes, any correlation in [0, 1] and
  any two distinct colours work.
"""

from __future__ import annotations

import torch

from benchmarks.errors import BenchError

DEFAULTS = {
    "classes": [[0, 3], [2, 4]],  # {T-shirt/top, Dress} vs {Pullover, Coat}: shape cues that take some learning
    "correlation": 0.95,
    "eval_correlation": 0.5,
    "colours": [[190, 80, 40], [40, 110, 190]],  # background of place 0 ("land") and place 1 ("water")
    "n_train": 0,  # 0 = every remaining training image of the chosen classes
    "n_val": 2000,
    "seed": 0,
}
NUM_GROUPS = 4


def resolve_kwargs(kwargs: dict) -> dict:
    """The generator's parameters: defaults overlaid with the protocol's data_kwargs, checked."""
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise BenchError(f"spurious-fashion: unknown data_kwargs key '{unknown[0]}' (known: {', '.join(DEFAULTS)})")
    params = dict(DEFAULTS, **kwargs)
    classes = params["classes"]
    if (not isinstance(classes, list) or len(classes) != 2
            or not all(isinstance(c, list) and c and all(isinstance(k, int) and 0 <= k <= 9 for k in c)
                       for c in classes)):
        raise BenchError(f"spurious-fashion: 'classes' must be two non-empty lists of Fashion-MNIST classes 0-9, "
                         f"got {classes!r}")
    if set(classes[0]) & set(classes[1]) or len(set(classes[0])) != len(classes[0]) \
            or len(set(classes[1])) != len(classes[1]):
        raise BenchError(f"spurious-fashion: the two super-classes must not share or repeat a class, got {classes!r}")
    for key in ("correlation", "eval_correlation"):
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise BenchError(f"spurious-fashion: '{key}' must be a number in [0, 1], got {value!r}")
    colours = params["colours"]
    if (not isinstance(colours, list) or len(colours) != 2
            or not all(isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                       for c in colours) or colours[0] == colours[1]):
        raise BenchError(f"spurious-fashion: 'colours' must be two distinct RGB triples of integers 0-255, "
                         f"got {colours!r}")
    for key in ("n_train", "n_val", "seed"):
        if isinstance(params[key], bool) or not isinstance(params[key], int) or params[key] < 0:
            raise BenchError(f"spurious-fashion: '{key}' must be an integer >= 0, got {params[key]!r}")
    return params


def assign_places(labels: torch.Tensor, correlation: float, generator: torch.Generator) -> torch.Tensor:
    """Background place per example: exactly round(correlation * n_c) examples of each label c get
    place c (agreeing), chosen at random; the others get 1 - c."""
    places = 1 - labels
    for c in (0, 1):
        members = (labels == c).nonzero().flatten()
        agree = round(correlation * len(members))
        chosen = members[torch.randperm(len(members), generator=generator)[:agree]]
        places[chosen] = c
    return places


def colour_backgrounds(gray: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, H, W] grey images and uint8 [N, 3] background colours -> uint8 [N, 3, H, W]."""
    g = gray.float()
    alpha = g / 255  # the garment's opacity: 0 on the background, 1 on its brightest pixels
    background = colours.float().view(-1, 3, 1, 1)
    return (g * alpha + background * (1 - alpha)).round().clamp(0, 255).to(torch.uint8)


def make_spurious_fashion(arrays: dict, kwargs: dict) -> dict:
    """Fashion-MNIST arrays (read_fashion_mnist) -> {split: (images [N,3,28,28], labels, groups)} and stats."""
    params = resolve_kwargs(kwargs)
    generator = torch.Generator().manual_seed(params["seed"])
    superclass = torch.full((10,), -1, dtype=torch.long)
    for label, members in enumerate(params["classes"]):
        superclass[members] = label
    colours = torch.tensor(params["colours"], dtype=torch.uint8)

    train_pool = (superclass[arrays["train_y"]] >= 0).nonzero().flatten()
    train_pool = train_pool[torch.randperm(len(train_pool), generator=generator)]
    n_val = params["n_val"]
    if n_val >= len(train_pool):
        raise BenchError(f"spurious-fashion: n_val={n_val} leaves no training images ({len(train_pool)} in these classes)")
    val_index, train_index = train_pool[:n_val], train_pool[n_val:]
    if params["n_train"]:
        if params["n_train"] > len(train_index):
            raise BenchError(f"spurious-fashion: n_train={params['n_train']} but only {len(train_index)} training "
                             f"images of these classes remain after n_val={n_val}")
        train_index = train_index[:params["n_train"]]
    test_index = (superclass[arrays["test_y"]] >= 0).nonzero().flatten()

    def build(images: torch.Tensor, fashion_labels: torch.Tensor, index: torch.Tensor, correlation: float):
        index = index.sort().values  # dataset order, independent of the draw order
        labels = superclass[fashion_labels[index]]
        places = assign_places(labels, correlation, generator)
        return colour_backgrounds(images[index], colours[places]), labels, 2 * labels + places

    splits = {"train": build(arrays["train_x"], arrays["train_y"], train_index, params["correlation"]),
              "val": build(arrays["train_x"], arrays["train_y"], val_index, params["eval_correlation"]),
              "test": build(arrays["test_x"], arrays["test_y"], test_index, params["eval_correlation"])}
    train_images = splits["train"][0]
    mean, std = [], []
    for c in range(3):  # one channel at a time: a third of the memory
        channel = train_images[:, c].double() / 255
        mean.append(channel.mean().item())
        std.append(max(channel.std().item(), 1e-3))
    return {"splits": splits, "stats": (tuple(mean), tuple(std)), "params": params}
