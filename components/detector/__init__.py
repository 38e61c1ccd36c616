"""The detector: the nested encoder-decoder GAN and its baselines, their factories,
training, scoring, evaluation and the model file.

Plain torch and numpy; may import ``components.data`` (images, splits), ``runtime``,
config/errors; never the registry, pipeline or cli.
"""
