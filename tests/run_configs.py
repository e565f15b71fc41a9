"""A small stage-two config for tests: tiny batches, few steps, checkpoint every 3 steps."""
from pipeline.config import Config
from stages.student.settings import LoraSettings, TrainConfig
from stages.teacher.settings import CacheConfig


def make_config(model_dir, cache_dir, out, **train) -> Config:
    settings = dict(output_dir=str(out), method="tail", max_steps=6, batch_size=4, save_steps=3,
                    logging_steps=1, learning_rate=3e-3, warmup_ratio=0.0, lora=LoraSettings(rank=4))
    return Config(model=str(model_dir), cache=CacheConfig(dir=str(cache_dir)), train=TrainConfig(**{**settings, **train}))
