"""Batched generation: bucketed chunked prefill, one-token decode steps, sampling (spec §2.8).

A `Generator` compiles one step program per token-chunk width and reuses it for
every request: prompts are fed in chunks of at most `prefill_chunk` tokens padded
to a power-of-two bucket, decode feeds one token per sequence. Every call passes
per-sequence lengths, so prompts of different lengths share a batch, a sequence
whose prompt has been consumed or whose generation has finished gets length 0
(its cache is left untouched), and nothing recompiles per step or per prompt length.

    gen = Generator(model, batch_size=4, max_len=2048)
    out = gen.generate([[0, 5, 9], [0, 7]], max_new_tokens=32, sampling=Sampling(0.7, top_p=0.9), seed=0)
    out.sequences[0].tokens
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.cache import init_cache
from v4jax.errors import CheckpointError, DataError
from v4jax.sampling import Sampling, sample, sequence_keys, token_keys
from v4jax.placement import cache_shardings
from v4jax.sharding import fetch, use_rules
from v4jax.tokens import bucket, check_token_ids


class Controls(NamedTuple):
    """Per-sequence sampling inputs of a batch, on device: PRNG keys and settings, each [batch]."""

    keys: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # generated tokens; a stop token that ended the sequence is not included
    finish_reason: str  # "stop" (a stop token was drawn) or "length" (max_new_tokens or max_len reached)


@dataclasses.dataclass
class Generation:
    sequences: list[Completion]
    prompt_tokens: int
    prefill_seconds: float  # includes compiling each prefill width on first use
    decode_seconds: float  # decode steps after each batch's first one (which may compile)
    decode_tokens: int  # tokens those steps drew, one per active sequence per step

    @property
    def new_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Generator:
    """Prefill and decode programs for one model, batch size and maximum length.

    The model's parameters are captured when the generator is built. With a `mesh`,
    the decode state is created sharded by `rules` and every step is traced under
    them (the model should already be placed on the mesh).
    """

    def __init__(self, model, *, batch_size: int = 1, max_len: int = 4096, prefill_chunk: int = 512,
                 min_bucket: int = 16, quantized_cache: bool = False, mesh=None, rules="inference"):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        if prefill_chunk < min_bucket or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two >= min_bucket ({min_bucket}), got {prefill_chunk}")
        self.cfg = model.cfg
        self.batch_size, self.max_len = batch_size, max_len
        self.prefill_chunk, self.min_bucket = prefill_chunk, min_bucket
        self.quantized_cache = quantized_cache
        self.mesh, self.rules = mesh, rules
        self._graphdef, self._params = nnx.split(model)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))

    # ------------------------------------------------------------------ programs
    def _step_fn(self, params, state, ids, lengths, controls: Controls):
        """ids: [batch, T], lengths: [batch] -> (drawn next tokens [batch], their logits [batch, vocab], state)."""
        model = nnx.merge(self._graphdef, params)
        logits, _, state = model.forward(ids, state, lengths)
        last = jnp.take_along_axis(logits, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        keys = token_keys(controls.keys, state["pos"])  # drawn token sits at position pos
        tokens = sample(last, keys, controls.temperature, controls.top_k, controls.top_p)
        return tokens, last, state

    def _run(self, state, ids: np.ndarray, lengths: np.ndarray, controls: Controls):
        if self.mesh is None:
            return self._step(self._params, state, ids, lengths, controls)
        with use_rules(self.mesh, self.rules):
            return self._step(self._params, state, ids, lengths, controls)

    def compiled_shapes(self) -> int:
        """How many step programs have been compiled (one per distinct chunk width)."""
        return self._step._cache_size()

    # ------------------------------------------------------------------ state and inputs
    def new_state(self) -> dict:
        """An empty decode state for batch_size sequences of up to max_len tokens."""
        def make():
            return init_cache(self.cfg, self.batch_size, self.max_len, quantized=self.quantized_cache)

        if self.mesh is None:
            return make()
        shardings = cache_shardings(jax.eval_shape(make), self.mesh, self.rules)
        return jax.jit(make, out_shardings=shardings)()

    def controls(self, sampling: Sampling | Sequence[Sampling] = Sampling(), seed: int = 0,
                 first_index: int = 0) -> Controls:
        """Sampling inputs for a batch whose row b holds request number first_index + b.

        Keys depend on the seed and the request number only, so a request draws the
        same tokens in any batch position and with any chunking.
        """
        rows = [sampling] * self.batch_size if isinstance(sampling, Sampling) else list(sampling)
        if len(rows) != self.batch_size:
            raise ValueError(f"{len(rows)} sampling settings for a batch of {self.batch_size}")
        return Controls(sequence_keys(seed, np.arange(first_index, first_index + self.batch_size)),
                        jnp.asarray([s.temperature for s in rows], jnp.float32),
                        jnp.asarray([s.top_k for s in rows], jnp.int32),
                        jnp.asarray([s.top_p for s in rows], jnp.float32))

    # ------------------------------------------------------------------ steps
    def prefill(self, state, tokens: Sequence[Sequence[int]], controls: Controls):
        """Feed tokens[b] to sequence b from its current position (an empty list leaves it untouched).

        Long inputs go in chunks of prefill_chunk, each padded to a bucket. Returns
        (next token [batch] drawn after each sequence's last fed token (0 where none
        was fed), its logits [batch, vocab] on device, the new state).
        """
        if len(tokens) != self.batch_size:
            raise ValueError(f"{len(tokens)} rows for a batch of {self.batch_size}")
        lens = np.array([len(t) for t in tokens])
        full = np.flatnonzero(fetch(state["pos"]) + lens > self.max_len)
        if full.size:
            raise ValueError(f"sequence {full[0]}: {lens[full[0]]} more tokens do not fit in max_len {self.max_len}")
        chunk = self.prefill_chunk
        next_tokens = np.zeros(self.batch_size, np.int32)
        last_logits = None
        for c in range(-(-int(lens.max(initial=0)) // chunk)):
            n = np.clip(lens - c * chunk, 0, chunk).astype(np.int32)
            ids = np.zeros((self.batch_size, bucket(int(n.max()), self.min_bucket)), np.int32)
            for b in np.flatnonzero(n):
                ids[b, :n[b]] = tokens[b][c * chunk:c * chunk + n[b]]
            drawn, logits, state = self._run(state, ids, n, controls)
            ends = (n > 0) & (lens <= (c + 1) * chunk)
            next_tokens = np.where(ends, fetch(drawn), next_tokens)
            last_logits = logits if last_logits is None else _where_rows(ends, logits, last_logits)
        return next_tokens, last_logits, state

    def decode(self, state, tokens: np.ndarray, active: np.ndarray, controls: Controls):
        """Feed one token per active sequence -> (next tokens [batch], their logits [batch, vocab], state)."""
        ids = np.asarray(tokens, np.int32).reshape(self.batch_size, 1)
        drawn, logits, state = self._run(state, ids, np.asarray(active, np.int32), controls)
        return fetch(drawn), logits, state

    # ------------------------------------------------------------------ whole requests
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling=Sampling(), seed: int = 0,
                 stop_tokens: Sequence[int] = (), on_token: Callable[[int, int], None] | None = None) -> Generation:
        """Complete every prompt (batch_size at a time); on_token(request index, token) streams tokens.
        Every prompt is checked (length, token ids) before any is run."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        for i, p in enumerate(prompts):
            if not 0 < len(p) <= self.max_len:
                raise DataError(f"prompt {i} has {len(p)} tokens; need 1 .. max_len = {self.max_len}")
            check_token_ids(p, self.cfg.vocab_size, f"prompt {i}")
        result = Generation([], sum(len(p) for p in prompts), 0.0, 0.0, 0)
        for first in range(0, len(prompts), self.batch_size):
            self._generate_batch(result, prompts[first:first + self.batch_size], first, max_new_tokens, sampling,
                                 seed, frozenset(stop_tokens), on_token)
        return result

    def _generate_batch(self, result: Generation, prompts, first, max_new_tokens, sampling, seed, stop, on_token):
        n = len(prompts)
        rows = [list(p) for p in prompts] + [[]] * (self.batch_size - n)
        controls = self.controls(sampling, seed, first)
        # the last generated token is never fed back, so a sequence may end at max_len + 1 tokens
        budget = [min(max_new_tokens, self.max_len + 1 - len(p)) for p in prompts]
        out: list[list[int]] = [[] for _ in range(n)]
        reason = ["length"] * n  # unless a stop token comes first
        active = np.zeros(self.batch_size, bool)
        active[:n] = np.array(budget) > 0

        t0 = time.perf_counter()
        tokens, _, state = self.prefill(self.new_state(), rows, controls)
        result.prefill_seconds += time.perf_counter() - t0
        steps = 0
        while True:
            for b in np.flatnonzero(active):
                tok = int(tokens[b])
                if tok in stop:
                    reason[b], active[b] = "stop", False
                    continue
                out[b].append(tok)
                if on_token is not None:
                    on_token(first + b, tok)
                active[b] = len(out[b]) < budget[b]
            if not active.any():
                break
            if steps == 1:  # time from the end of the first step on
                t0 = time.perf_counter()
            tokens, _, state = self.decode(state, tokens, active, controls)
            steps += 1
            result.decode_tokens += int(active.sum()) if steps > 1 else 0
        if steps > 1:
            result.decode_seconds += time.perf_counter() - t0
        result.sequences += [Completion(o, r) for o, r in zip(out, reason)]


@jax.jit
def _where_rows(rows, new, old):
    """rows: [batch] bool -> new where rows else old, [batch, ...] (jitted: the logits may span processes)."""
    return jnp.where(rows[:, None], new, old)


# ---------------------------------------------------------------------------- text and stop tokens
class TextStream:
    """Incremental detokenisation: push a token, get the text it completes.

    Text is held back while it ends in an unfinished UTF-8 sequence (decoded as U+FFFD).
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.text = text[len(self.text):], text
        return new


def stop_tokens_of(ckpt: str | Path) -> list[int]:
    """eos_token_id of a checkpoint folder's generation_config.json or config.json (none if absent)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(ckpt) / name
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: not a JSON file: {e}") from None
            eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
            if eos is not None:
                eos = eos if isinstance(eos, list) else [eos]
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
                    raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, "
                                          f"got {json.dumps(raw['eos_token_id'])}")
                return eos
    return []
