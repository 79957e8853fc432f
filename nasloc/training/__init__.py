"""Standalone training: data sets (:mod:`.data`), loaders (:mod:`.loader`), checkpoints (:mod:`.checkpoint`),
the recipe (:mod:`.recipe`) and its augmentation (:mod:`.augment`), devices and DDP (:mod:`.distributed`), and the
retraining loop (:mod:`.retrain`)."""
