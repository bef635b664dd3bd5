"""Fine-tuning with DeepSpeed ZeRO: expert, multitask and instruction-tuning recipes.

    from mergescale.training import train
    manifest = train("expert", "configs/train/expert-sentiment.yaml")
"""


def train(recipe, config, **kwargs):
    """Train `recipe` (expert | multitask | instruct) with `config` (TrainConfig, dict or YAML path) on Ray Train; see
    api.train (mergescale.api.train hands it the Ray launch; imported lazily to keep `import mergescale.training`
    light)."""
    from mergescale.api import train as _train

    return _train(recipe, config, **kwargs)
