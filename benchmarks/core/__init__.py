"""One run: resolve, train, evaluate, meter, record, checkpoint; protocols, models, augmentation, data parallel."""
