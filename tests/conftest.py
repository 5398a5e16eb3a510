import os
import sys

import pytest

# Eight simulated CPU devices for the sharding tests; set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))  # tests import the numpy oracle as `oracle`


@pytest.fixture(scope="session")
def word_ckpt(tmp_path_factory):
    """A two-layer random checkpoint in the published layout (CSA, HCA and window-only layers,
    one hash layer) with a word-level tokenizer.json: "w17" is token 17."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from v4jax.checkpoint import write_random_checkpoint
    from v4jax.config import ModelConfig

    raw = json.load(open("configs/tiny.json"))
    raw.update(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)
    path = write_random_checkpoint(ModelConfig.from_dict(raw), tmp_path_factory.mktemp("ckpt") / "tiny")
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(raw["vocab_size"])}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    return path
