"""Fine-tuning with DeepSpeed ZeRO: expert, multitask and instruction-tuning recipes.

    from mergescale.training import train
    manifest = train("expert", "configs/train/expert-sentiment.yaml")
"""


def train(recipe, config, **kwargs):
    """Train `recipe` (expert | multitask | instruct) with `config` (TrainConfig, dict or YAML path); see api.train."""
    from mergescale.training.api import train as _train  # keeps `import mergescale.training` light

    return _train(recipe, config, **kwargs)
