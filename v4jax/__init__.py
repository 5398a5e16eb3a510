"""v4jax: DeepSeek-V4 (Flash / Pro) in JAX + Flax NNX.

    cfg = v4jax.ModelConfig.from_json("configs/flash.json")
    model = v4jax.Transformer(cfg, rngs=nnx.Rngs(0))
    logits = model(input_ids)                     # [batch, seq, vocab] float32
    model = v4jax.load_pretrained(path, mesh=mesh)  # published folder or converted Orbax folder
"""

from v4jax.config import ConfigError, ModelConfig
from v4jax.model import Transformer


def load_pretrained(*args, **kwargs):
    """See `v4jax.checkpoint.loading.load_pretrained` (imported lazily: it pulls in Orbax)."""
    from v4jax.checkpoint.loading import load_pretrained as load

    return load(*args, **kwargs)


__all__ = ["ConfigError", "ModelConfig", "Transformer", "load_pretrained"]
