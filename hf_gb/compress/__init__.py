"""Compressing a model that already has weights: regression to its weights (`regression`) and distillation from it
(`distill`, with the text data it trains on in `data`)."""
