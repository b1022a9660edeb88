"""Adapters of model libraries (timm, torchvision, transformers, ultralytics), loaded by the registry on demand."""
