"""How `transformers serve` (5.25 and later) loads the model it serves, for hf-serve: from a config, with
random weights, in the model's own process.

The server spawns that process and hands it a copy of its `ModelLoader`; this subclass builds the model from
the config it carries instead of downloading weights, and answers the server's config and processor questions
from the same config and the word tokenizer (revati.engines.hf_serve). Everything else is the server's own:
its attention choice, its device ("auto"), its continuous batching. Its own module, imported only where the
serving extras are, as the spawned process imports it to unpickle the loader.
"""

from __future__ import annotations

from transformers import GenerationConfig, PretrainedConfig
from transformers.cli.serving.model_manager import ModelLoader

from revati.models import build_model


class RandomWeights(ModelLoader):
    """A `ModelLoader` for the model of `config`, its weights random, in `dtype` (None: the config's)."""

    def __init__(self, config: PretrainedConfig, dtype: str | None, attn_implementation: str | None):
        super().__init__(
            dtype=dtype or "auto", attn_implementation=attn_implementation, continuous_batching=True
        )
        self.config = config

    def load_config(self, model_id: str) -> tuple[PretrainedConfig, GenerationConfig]:
        return self.config, GenerationConfig.from_model_config(self.config)

    def load_processor(self, model_id: str):
        from revati.engines.hf_serve import word_tokenizer

        return word_tokenizer(self.config.get_text_config().vocab_size)

    def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
        import torch

        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(self.config, device, None if self.dtype == "auto" else self.dtype)
        if self.attn_implementation is not None:
            model.set_attn_implementation(self.attn_implementation)
        return model
