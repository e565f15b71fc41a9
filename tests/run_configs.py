"""A small stage-two config for tests: tiny batches, few steps, checkpoint every 3 steps; its `data:`
names the data the cache holds (train refuses a config naming other data)."""
from pathlib import Path

from pipeline.config import Config
from stages.data.inputs import DataConfig
from stages.student.settings import LoraSettings, TrainConfig
from stages.teacher.settings import CacheConfig
from storage_schemas import Manifest


def cache_data(cache_dir) -> DataConfig:
    """The `data:` section under which stage one would have written the cache in `cache_dir`."""
    if not (Path(cache_dir) / "manifest.json").exists():
        return DataConfig()
    manifest = Manifest.load(cache_dir)
    return DataConfig(path=manifest.dataset.source, split=manifest.dataset.split, max_length=manifest.settings.max_length)


def make_config(model_dir, cache_dir, out, **train) -> Config:
    settings = dict(output_dir=str(out), method="tail", max_steps=6, batch_size=4, save_steps=3,
                    logging_steps=1, learning_rate=3e-3, warmup_ratio=0.0, lora=LoraSettings(rank=4))
    return Config(model=str(model_dir), data=cache_data(cache_dir), cache=CacheConfig(dir=str(cache_dir)),
                  train=TrainConfig(**{**settings, **train}))
