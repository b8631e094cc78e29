"""Training: the official EfficientViT recipe in Optax, a Grain input pipeline, Orbax checkpoints."""
