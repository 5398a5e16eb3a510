"""Generation: continuous batching over fixed slots, chunked prefill, plain or speculative decode (spec §2.8).

A `Generator` owns `batch_size` slots and compiles one step program per token-chunk
width (and, for the slots refilling together, per power-of-two count of them). Requests wait
in a queue; a slot whose sequence finished takes the next one at once, its state rows are
cleared and its prompt is fed in chunks of at most `prefill_chunk` tokens: each round, every
slot with prompt left feeds one chunk in one shared step over just those slots (their rows
gathered from the state and written back), then the decoding slots take a step (per-row
lengths say what each slot feeds, 0 leaves a slot untouched). Results come back as each
request finishes. Steps that only decode run on device in one program of up to
`DECODE_STEPS` steps (stop tokens and budgets checked there; it returns after the first
step that ends a sequence while requests wait, so the slot is refilled at once); the host
sees the tokens once per dispatch, not once per token. Steps with prompt tokens take a
power-of-two bucket of widths, so nothing recompiles per step, per prompt length or per
request (`warm_up` compiles them all up front).

With speculative=True every decoding slot also verifies one token drafted by the
MTP block (v4jax.speculative): greedy output is plain greedy's, sampled output
follows the same distribution.

    gen = Generator(model, batch_size=4, max_len=2048)
    out = gen.generate([[0, 5, 9], [0, 7]], max_new_tokens=32, sampling=Sampling(0.7, top_p=0.9), seed=0)
    out.sequences[0].tokens
    for i, completion in gen.serve(Request(p, 64) for p in prompts): ...
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.cache import clear_rows, init_cache
from v4jax.config import load_json_file
from v4jax.errors import CheckpointError, ConfigError, DataError
from v4jax.placement import cache_shardings
from v4jax.sampling import Sampling, sample, sequence_keys, token_keys
from v4jax.sharding import fetch, use_rules
from v4jax.speculative import make_verify_step, may_draft, verify_step
from v4jax.tokens import bucket, check_token_ids

# Most decode steps one dispatch runs: the host emits tokens, checks stop strings and refills
# slots between dispatches (the program returns early when a sequence ends and a request waits).
DECODE_STEPS = 32
# With a stop string (checked on the host) in a live slot a dispatch runs at most this many steps,
# so a sequence that stopped holds its slot for at most STRING_CHECK_STEPS - 1 extra steps.
STRING_CHECK_STEPS = 4


class Controls(NamedTuple):
    """Per-sequence sampling inputs of a batch, on device: PRNG keys and settings, each [batch]."""

    keys: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to complete. Its sampling keys come from (seed, key_index) only, so it draws the
    same tokens in any slot, next to any other requests."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop_tokens: frozenset[int] = frozenset()
    seed: int = 0
    key_index: int = 0
    # after each step that drew tokens, until(the tokens drawn so far) -> True ends the sequence
    # there ("stop", its tokens kept): stop strings, checked on the decoded text as it grows
    until: Callable[[Sequence[int]], bool] | None = None


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # generated tokens; a stop token that ended the sequence is not included
    finish_reason: str  # "stop" (a stop token was drawn, or `until` said so) or "length" (max_new_tokens or max_len)
    drafted: int = 0  # verify steps with an MTP draft (speculative decoding)
    accepted: int = 0  # of those drafts, how many were kept


@dataclasses.dataclass
class Generation:
    sequences: list[Completion]
    prompt_tokens: int
    prefill_seconds: float = 0.0  # steps that fed prompt tokens (on a mesh decode rows ride along), compiles included
    decode_seconds: float = 0.0  # steps that only decoded, except those that compiled
    decode_tokens: int = 0  # tokens those steps drew
    decode_steps: int = 0  # how many such steps

    @property
    def new_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def acceptance(self) -> float:
        """Fraction of MTP drafts kept (0 without speculation)."""
        drafted = sum(s.drafted for s in self.sequences)
        return sum(s.accepted for s in self.sequences) / drafted if drafted else 0.0


@dataclasses.dataclass
class _Slot:
    """A request in a batch slot: what was fed, what was drawn, the token to feed next."""

    index: int
    request: Request
    budget: int
    fed: int = 0
    pending: int = 0  # drawn, not yet fed
    draft: int = 0  # MTP draft for the position after pending
    out: list = dataclasses.field(default_factory=list)
    reason: str = "length"
    done: bool = False
    drafted: int = 0
    accepted: int = 0

    def emit(self, token: int, on_token) -> None:
        if self.done:
            return
        if token in self.request.stop_tokens:
            self.reason, self.done = "stop", True
            return
        self.out.append(token)
        if on_token is not None:
            on_token(self.index, token)
        self.done = len(self.out) >= self.budget

    def check_until(self, before: int) -> None:
        """After emits that grew `out` from `before` tokens: end the slot if its text now holds one
        of the request's stop strings (a stop token already ended it otherwise)."""
        if self.request.until is not None and self.reason != "stop" and len(self.out) > before \
                and self.request.until(self.out):
            self.reason, self.done = "stop", True


class Generator:
    """Prefill and decode programs for one model, batch size and maximum length.

    The model's parameters are captured when the generator is built. With a `mesh`,
    the decode state is created sharded by `rules` and every step is traced under
    them (the model should already be placed on the mesh).
    """

    def __init__(self, model, *, batch_size: int = 1, max_len: int = 4096, prefill_chunk: int = 512,
                 min_bucket: int = 16, quantized_cache: bool = False, mesh=None, rules="inference",
                 speculative: bool = False):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        if prefill_chunk < min_bucket or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two >= min_bucket ({min_bucket}), got {prefill_chunk}")
        if speculative and not model.cfg.num_nextn_predict_layers:
            raise ConfigError("speculative decoding drafts with the MTP block; num_nextn_predict_layers is 0")
        self.cfg = model.cfg
        self.batch_size, self.max_len = batch_size, max_len
        self.prefill_chunk, self.min_bucket = prefill_chunk, min_bucket
        self.quantized_cache = quantized_cache
        self.mesh, self.rules = mesh, rules
        self.speculative = speculative
        self._graphdef, params = nnx.split(model)
        self._params = self._committed(params)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))
        self._verify = jax.jit(make_verify_step(self._graphdef), donate_argnums=(1,))
        self._verify_loop = jax.jit(self._verify_loop_fn, donate_argnums=(1,))
        self._rows_step = jax.jit(self._rows_fn, donate_argnums=(1,))
        self._clear = jax.jit(clear_rows, donate_argnums=(0,))

    # ------------------------------------------------------------------ programs
    def _step_fn(self, params, state, ids, lengths, controls: Controls):
        """ids: [batch, T], lengths: [batch] -> (drawn next tokens [batch], their logits [batch, vocab], state)."""
        model = nnx.merge(self._graphdef, params)
        logits, _, state = model.forward(ids, state, lengths)
        last = jnp.take_along_axis(logits, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        keys = token_keys(controls.keys, state["pos"])  # drawn token sits at position pos
        tokens = sample(last, keys, controls.temperature, controls.top_k, controls.top_p)
        return tokens, last, state

    def _decode_fn(self, params, state, tokens, left, stops, steps, halt, controls: Controls):
        """Up to `steps` (<= DECODE_STEPS) plain decode steps of the batch in one program.

        tokens: [batch] the token each row feeds next; left: [batch] tokens each row may still draw
        (0: an idle row, fed nothing); stops: [batch, vocab] bool, the row's stop tokens; halt: return
        after the first step in which a row ends (a stop token, or its last allowed token). A row ends
        as Slot.emit decides, so the host replaying the tokens agrees. Returns (drawn [batch,
        DECODE_STEPS]: the token each step drew, -1 where the row was idle; steps run; state).
        """
        batch = tokens.shape[0]

        def more(carry):
            i, _, left, _, _, ended = carry
            return (i < steps) & (left > 0).any() & ~(halt & ended)

        def step(carry):
            i, tokens, left, drawn, state, _ = carry
            active = left > 0
            token, _, state = self._step_fn(params, state, tokens[:, None], active.astype(jnp.int32), controls)
            stop = stops[jnp.arange(batch), token]
            new_left = jnp.where(active, jnp.where(stop, 0, left - 1), 0)
            drawn = drawn.at[:, i].set(jnp.where(active, token, -1))
            return i + 1, jnp.where(active, token, tokens), new_left, drawn, state, (active & (new_left == 0)).any()

        drawn = jnp.full((batch, DECODE_STEPS), -1, jnp.int32)
        carry = (jnp.int32(0), tokens, left, drawn, state, jnp.bool_(False))
        i, _, _, drawn, state, _ = jax.lax.while_loop(more, step, carry)
        return drawn, i, state

    def _verify_loop_fn(self, params, state, pending, draft, q, left, stops, steps, halt, controls: Controls):
        """Up to `steps` (<= DECODE_STEPS) speculative steps of the batch in one program (verify_step:
        each row feeds its pending token and, where may_draft allows, its draft).

        pending, draft: [batch]; q: [batch, vocab] the draft's probs; left, stops, halt as in _decode_fn.
        Each step emits, as Slot.emit would, the kept draft and then the drawn token, each ending the
        row at a stop token or its last allowed token. Returns (emitted [batch, 2 * DECODE_STEPS]: per
        step the kept draft and the drawn token, -1 where none (a stop token is emitted, then the row
        ends); drafted [batch, DECODE_STEPS] bool; steps run; the next drafts [batch], q, state).
        """
        model = nnx.merge(self._graphdef, params)
        batch = pending.shape[0]
        rows = jnp.arange(batch)

        def more(carry):
            i, left, ended = carry[0], carry[4], carry[-1]
            return (i < steps) & (left > 0).any() & ~(halt & ended)

        def step(carry):
            i, pending, draft, q, left, emitted, drafted_at, state, _ = carry
            active = left > 0
            drafted = active & may_draft(self.cfg, state["pos"], self.max_len)
            ids = jnp.stack([pending, jnp.where(drafted, draft, 0)], axis=1)
            lengths = active.astype(jnp.int32) * (1 + drafted)
            token, accepted, next_draft, q_next, state = verify_step(
                model, state, ids, lengths, drafted, jnp.full((batch,), -1, jnp.int32), q, controls)
            kept = drafted & accepted
            kept_stop = kept & stops[rows, draft]
            left = jnp.where(kept, left - 1, left)
            ended = kept_stop | (kept & (left == 0))
            emits = active & ~ended
            left = jnp.where(emits, left - 1, left)
            ended |= emits & (stops[rows, token] | (left == 0))
            emitted = emitted.at[:, 2 * i].set(jnp.where(kept, draft, -1))
            emitted = emitted.at[:, 2 * i + 1].set(jnp.where(emits, token, -1))
            drafted_at = drafted_at.at[:, i].set(drafted)
            return (i + 1, jnp.where(active, token, pending), jnp.where(active, next_draft, draft),
                    jnp.where(active[:, None], q_next, q), jnp.where(ended, 0, left), emitted, drafted_at, state,
                    (active & ended).any())

        carry = (jnp.int32(0), pending, draft, q, left, jnp.full((batch, 2 * DECODE_STEPS), -1, jnp.int32),
                 jnp.zeros((batch, DECODE_STEPS), bool), state, jnp.bool_(False))
        i, _, draft, q, _, emitted, drafted_at, state, _ = jax.lax.while_loop(more, step, carry)
        return emitted, drafted_at, i, draft, q, state

    def _rows_fn(self, params, state, rows, ids, lengths, drafted, follow, q, controls: Controls):
        """A step of some slots on their own: rows [k] distinct slot numbers, ids [k, T] -> as verify_step
        over those rows ([k] results), with the full q and state (the rows' parts written back in place).
        A row fed nothing (lengths 0: a filler up to a bucketed k) keeps its state and its q."""
        axes = _batch_axes(state)
        sub = jax.tree.map(lambda a, axis: jnp.take(a, rows, axis=axis), state, axes)
        some = Controls(*(c[rows] for c in controls))
        if self.speculative:
            token, accepted, draft, q_rows, sub = verify_step(nnx.merge(self._graphdef, params), sub, ids, lengths,
                                                             drafted, follow, q[rows], some)
            q = q.at[rows].set(jnp.where((lengths > 0)[:, None], q_rows, q[rows]))
        else:
            token, _, sub = self._step_fn(params, sub, ids, lengths, some)
            accepted, draft = jnp.zeros_like(drafted), token
        state = jax.tree.map(lambda a, r, axis: a.at[(slice(None),) * axis + (rows,)].set(r), state, sub, axes)
        return token, accepted, draft, q, state

    def _call(self, fn, *args):
        if self.mesh is None:
            return fn(*args)
        with use_rules(self.mesh, self.rules):
            return fn(*args)

    def _run(self, state, ids: np.ndarray, lengths: np.ndarray, controls: Controls):
        return self._call(self._step, self._params, state, ids, lengths, controls)

    def compiled_shapes(self) -> int:
        """How many step programs have been compiled (one per chunk width and, for steps of some slots on
        their own, per bucketed number of slots)."""
        return (self._step._cache_size() + self._decode._cache_size() + self._verify._cache_size()
                + self._verify_loop._cache_size() + self._rows_step._cache_size())

    def warm_up(self) -> int:
        """Compile every step program serve() can run (each run once, feeding nothing, on a scratch
        state) and the slot-clearing one, so no request pays a compile. Returns how many step
        programs there are."""
        state = self.new_state()
        q = self._draft_probs()
        controls = self.controls()
        widths = sorted({bucket(1 << k, self.min_bucket) for k in range(self.prefill_chunk.bit_length())})
        parts = [] if self.mesh is not None else [1 << k for k in range((self.batch_size - 1).bit_length())]
        shapes = [(self.batch_size, 1 + self.speculative)] + [(r, w) for w in widths for r in parts + [self.batch_size]]
        zeros = np.zeros(self.batch_size, np.int32)
        if self.speculative:  # decode-only steps: the on-device loops (steps beside prompt chunks: one each)
            *_, q, state = self._call(self._verify_loop, self._params, state, zeros, zeros, q, zeros,
                                      self._slot_stops([None] * self.batch_size), np.int32(0), np.bool_(False),
                                      controls)
        else:  # plain prompt chunks still use _step
            shapes = shapes[1:]
            _, state = self.decode_steps(state, zeros, zeros, controls, steps=0)
        for rows, width in shapes:  # decode steps always take the whole batch
            ids, n = np.zeros((rows, width), np.int32), np.zeros(rows, np.int32)
            no = (np.zeros(rows, bool), np.full(rows, -1, np.int32))
            if rows < self.batch_size:
                _, _, _, q, state = self._call(self._rows_step, self._params, state, np.arange(rows, dtype=np.int32),
                                               ids, n, *no, q, controls)
            elif self.speculative:
                _, _, _, q, state = self.verify(state, ids, n, *no, q, controls)
            else:
                _, _, state = self._run(state, ids, n, controls)
        jax.block_until_ready(self._call(self._clear, state, np.zeros(self.batch_size, bool)))
        self._slot_controls([None] * self.batch_size)
        return self.compiled_shapes()

    # ------------------------------------------------------------------ state and inputs
    def new_state(self) -> dict:
        """An empty decode state for batch_size sequences of up to max_len tokens."""
        def make():
            return init_cache(self.cfg, self.batch_size, self.max_len, quantized=self.quantized_cache)

        if self.mesh is None:
            return self._committed(make())
        shardings = cache_shardings(jax.eval_shape(make), self.mesh, self.rules)
        return jax.jit(make, out_shardings=shardings)()

    def _committed(self, tree):
        """Without a mesh, `tree` committed to the default device. A program's cache entry is keyed on
        whether its arguments are committed: a fresh (uncommitted) state or draft buffer next to committed
        outputs of earlier steps (committed parameters, as loaded checkpoints have, make them so) would
        compile each program a second time. On a mesh everything is placed already."""
        return tree if self.mesh is not None else jax.device_put(tree, jax.devices()[0])

    def _draft_probs(self) -> jax.Array:
        """The draft probabilities [batch, vocab] a speculative run starts from (unused otherwise)."""
        return self._committed(jnp.zeros((self.batch_size, self.cfg.vocab_size), jnp.float32))

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
                        *_settings(rows))

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

    def decode_steps(self, state, tokens: np.ndarray, left: np.ndarray, controls: Controls, stops=None,
                     steps: int = DECODE_STEPS, halt: bool = False):
        """Up to `steps` decode steps in one dispatch: tokens [batch] fed first, left [batch] tokens each
        row may still draw (0: idle), stops [batch, vocab] bool (default none), halt: return after the
        first step that ends a row -> (drawn [batch, steps run] on the host, -1 where a row was idle
        or had ended, state). A row ends at a stop token (drawn, not fed) or when left reaches 0."""
        if not 0 <= steps <= DECODE_STEPS:
            raise ValueError(f"steps must be in [0, {DECODE_STEPS}], got {steps}")
        # always a device array: a host one would key a second program cache entry (a retrace)
        stops = jnp.zeros((self.batch_size, self.cfg.vocab_size), bool) if stops is None else jnp.asarray(stops)
        drawn, n, state = self._call(self._decode, self._params, state, np.asarray(tokens, np.int32),
                                     np.asarray(left, np.int32), stops, np.int32(steps), np.bool_(halt), controls)
        return fetch(drawn)[:, :int(fetch(n))], state

    def verify(self, state, ids: np.ndarray, lengths: np.ndarray, drafted: np.ndarray, follow: np.ndarray, q,
               controls: Controls):
        """One speculative step (v4jax.speculative.verify_step) -> (token, accepted, next draft [batch] on
        the host, next draft probs [batch, vocab] on device, state)."""
        token, accepted, draft, q, state = self._call(self._verify, self._params, state, ids, lengths, drafted,
                                                      follow, q, controls)
        return fetch(token), fetch(accepted), fetch(draft), q, state

    # ------------------------------------------------------------------ whole requests
    def check(self, prompt: Sequence[int], where: str) -> None:
        """A prompt the generator can take: 1 .. max_len tokens inside the vocabulary."""
        if not 0 < len(prompt) <= self.max_len:
            raise DataError(f"{where} has {len(prompt)} tokens; need 1 .. max_len = {self.max_len}")
        check_token_ids(prompt, self.cfg.vocab_size, where)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling=Sampling(), seed: int = 0,
                 stop_tokens: Sequence[int] = (), on_token: Callable[[int, int], None] | None = None) -> Generation:
        """Complete every prompt (continuously batched); on_token(request index, token) streams tokens.
        Every prompt is checked (length, token ids) before any is run. sampling: one setting, or one per prompt."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        for i, p in enumerate(prompts):
            self.check(p, f"prompt {i}")
        settings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(settings) != len(prompts):
            raise ValueError(f"{len(settings)} sampling settings for {len(prompts)} prompts")
        stop = frozenset(stop_tokens)
        requests = [Request(list(p), max_new_tokens, s, stop, seed, i) for i, (p, s) in enumerate(zip(prompts, settings))]
        result = Generation([None] * len(prompts), sum(len(p) for p in prompts))
        for i, completion in self.serve(requests, on_token, result):
            result.sequences[i] = completion
        return result

    def serve(self, requests: Iterable[Request], on_token: Callable[[int, int], None] | None = None,
              stats: Generation | None = None) -> Iterator[tuple[int, Completion]]:
        """Run requests through the slots, yielding (request's position in `requests`, its completion)
        as each finishes. Requests are taken as slots free up, so `requests` may be a lazy queue.
        stats (optional) accumulates the step timings."""
        queue = enumerate(requests)
        slots: list[_Slot | None] = [None] * self.batch_size
        state = self.new_state()
        q = self._draft_probs()  # speculative only
        controls, stops, exhausted = None, None, False
        while True:
            cleared = np.zeros(self.batch_size, bool)
            for b in range(self.batch_size):
                while slots[b] is None and not exhausted:
                    nxt = next(queue, None)
                    if nxt is None:
                        exhausted = True
                        break
                    slot = self._admit(*nxt)
                    if slot.budget == 0:
                        yield slot.index, Completion([], "length")
                        continue
                    slots[b], cleared[b], controls = slot, True, None
            if all(s is None for s in slots):
                return
            if cleared.any():
                state = self._call(self._clear, state, cleared)
            if controls is None:
                controls, stops = self._slot_controls(slots), self._slot_stops(slots)
            state, q = self._advance(slots, state, q, controls, stops, not exhausted, on_token, stats)
            for b, slot in enumerate(slots):
                if slot is not None and slot.done:
                    slots[b] = None
                    yield slot.index, Completion(slot.out, slot.reason, slot.drafted, slot.accepted)

    def _admit(self, index: int, request: Request) -> _Slot:
        if request.max_new_tokens < 0:
            raise ValueError(f"request {index}: max_new_tokens must be >= 0, got {request.max_new_tokens}")
        self.check(request.prompt, f"request {index}")
        # the last generated token is never fed back, so a sequence may end at max_len + 1 tokens
        budget = min(request.max_new_tokens, self.max_len + 1 - len(request.prompt))
        return _Slot(index, request, budget)

    def _slot_controls(self, slots) -> Controls:
        seeds, indices = (np.array([getattr(s.request, f) if s is not None else 0 for s in slots], np.uint32)
                          for f in ("seed", "key_index"))
        return Controls(_slot_keys(seeds, indices),
                        *_settings([s.request.sampling if s is not None else Sampling() for s in slots]))

    def _slot_stops(self, slots) -> jax.Array:
        """[batch, vocab] bool on device: each slot's stop tokens (for the on-device decode loop)."""
        stops = np.zeros((self.batch_size, self.cfg.vocab_size), bool)
        for b, s in enumerate(slots):
            if s is not None:
                stops[b, list(s.request.stop_tokens)] = True
        return jnp.asarray(stops)

    def _advance(self, slots, state, q, controls: Controls, stops, waiting: bool, on_token, stats):
        """One round of steps. While slots have prompt left they take a chunk each, together in one step
        (a program over just those slots, their count padded to a power of two, so it costs their tokens,
        not batch x width), then the slots that were decoding take one step. Otherwise the decoding slots
        run up to DECODE_STEPS steps in one dispatch, returning early when one ends and a request is
        `waiting`. On a mesh every step shares the whole batch (a part of it would not split over the
        data axes). With speculation every decode step is a verify step: one per dispatch beside prompt
        chunks, in the on-device loop (_verify_loop_fn) otherwise."""
        live = np.array([s is not None for s in slots])
        pre = np.array([s is not None and s.fed < len(s.request.prompt) for s in slots])
        decoding = live & ~pre
        if pre.any() and (self.speculative or self.mesh is not None):
            if self.mesh is not None:
                return self._step_rows(slots, live, state, q, controls, on_token, stats)
            state, q = self._step_rows(slots, pre, state, q, controls, on_token, stats, alone=True)
            if decoding.any():
                state, q = self._step_rows(slots, decoding, state, q, controls, on_token, stats)
            return state, q
        if pre.any():
            state, q = self._step_rows(slots, pre, state, q, controls, on_token, stats, alone=True)
            steps = 1
        elif any(slots[b].request.until is not None for b in np.flatnonzero(decoding)):
            steps = STRING_CHECK_STEPS
        else:
            steps = DECODE_STEPS
        if decoding.any() and self.speculative:
            state, q = self._verify_rows(slots, decoding, state, q, controls, stops, steps, waiting, on_token, stats)
        elif decoding.any():
            state = self._decode_rows(slots, decoding, state, controls, stops, steps, waiting, on_token, stats)
        return state, q

    def _verify_rows(self, slots, rows, state, q, controls: Controls, stops, steps: int, halt: bool, on_token,
                     stats):
        """Up to `steps` speculative steps of the slots in rows [batch] bool in one dispatch
        (_verify_loop_fn), replayed on the host as _decode_rows does."""
        pending, draft, left = (np.zeros(self.batch_size, np.int32) for _ in range(3))
        for b in np.flatnonzero(rows):
            s = slots[b]
            pending[b], draft[b], left[b] = s.pending, s.draft, s.budget - len(s.out)
        compiled = self.compiled_shapes()
        t0 = time.perf_counter()
        emitted, drafted, n, next_draft, q, state = self._call(
            self._verify_loop, self._params, state, pending, draft, q, left, stops, np.int32(steps), np.bool_(halt),
            controls)
        n = int(fetch(n))
        emitted, drafted, next_draft = fetch(emitted), fetch(drafted), fetch(next_draft)
        seconds = time.perf_counter() - t0
        made = 0
        for b in np.flatnonzero(rows):
            s = slots[b]
            for i in range(n):
                kept, token = emitted[b, 2 * i], emitted[b, 2 * i + 1]
                if s.done or (kept < 0 and token < 0):
                    break
                before = len(s.out)
                s.fed += 1 + (kept >= 0)
                s.drafted += int(drafted[b, i])
                if kept >= 0:
                    s.accepted += 1
                    s.emit(int(kept), on_token)
                if token >= 0:
                    s.emit(int(token), on_token)
                    s.pending = int(token)
                s.check_until(before)
                made += len(s.out) - before
            s.draft = int(next_draft[b])
        if stats is not None and self.compiled_shapes() == compiled:
            stats.decode_seconds += seconds
            stats.decode_tokens += made
            stats.decode_steps += n
        return state, q

    def _decode_rows(self, slots, rows, state, controls: Controls, stops, steps: int, halt: bool, on_token, stats):
        """Up to `steps` decode steps of the slots in rows [batch] bool in one dispatch (decode_steps);
        the host then replays each slot's tokens through emit and its stop-string check, which may end
        it before the device did (the rest of its tokens are dropped; the slot is cleared on reuse)."""
        tokens, left = np.zeros(self.batch_size, np.int32), np.zeros(self.batch_size, np.int32)
        for b in np.flatnonzero(rows):
            tokens[b], left[b] = slots[b].pending, slots[b].budget - len(slots[b].out)
        compiled = self.compiled_shapes()
        t0 = time.perf_counter()
        drawn, state = self.decode_steps(state, tokens, left, controls, stops, steps, halt)
        seconds = time.perf_counter() - t0
        made = 0
        for b in np.flatnonzero(rows):
            s = slots[b]
            for token in drawn[b][drawn[b] >= 0]:
                if s.done:
                    break
                before = len(s.out)
                s.fed += 1
                s.emit(int(token), on_token)
                s.check_until(before)
                made += len(s.out) - before
                s.pending = int(token)
        if stats is not None and self.compiled_shapes() == compiled:
            stats.decode_seconds += seconds
            stats.decode_tokens += made
            stats.decode_steps += drawn.shape[1]
        return state

    def _step_rows(self, slots, rows, state, q, controls: Controls, on_token, stats, alone: bool = False):
        """One step for the slots in rows [batch] bool: a prompt chunk, or the pending token (and its
        draft); alone: run those slots in a program of their own (bucketed count) unless that is the batch."""
        n = np.zeros(self.batch_size, np.int32)
        prefilling = np.zeros(self.batch_size, bool)
        drafted = np.zeros(self.batch_size, bool)
        for b in np.flatnonzero(rows):
            s = slots[b]
            prompt = s.request.prompt
            if s.fed < len(prompt):
                prefilling[b], n[b] = True, min(len(prompt) - s.fed, self.prefill_chunk)
            else:
                drafted[b] = self.speculative and may_draft(self.cfg, s.fed, self.max_len)
                n[b] = 1 + drafted[b]
        width = bucket(int(n.max()), self.min_bucket) if prefilling.any() else 1 + self.speculative
        ids = np.zeros((self.batch_size, width), np.int32)
        follow = np.full(self.batch_size, -1, np.int32)
        for b in np.flatnonzero(rows):
            s = slots[b]
            if prefilling[b]:
                prompt = s.request.prompt
                ids[b, :n[b]] = prompt[s.fed:s.fed + n[b]]
                if s.fed + n[b] < len(prompt):
                    follow[b] = prompt[s.fed + n[b]]
            else:
                ids[b, :n[b]] = [s.pending, s.draft][:n[b]]
        # a part of the batch: its slots, then fillers (distinct slots fed nothing) up to a power of two
        part = None
        if alone and bucket(int(rows.sum()), 1) < self.batch_size:
            part = np.concatenate([np.flatnonzero(rows), np.flatnonzero(~rows)])[:bucket(int(rows.sum()), 1)]

        compiled = self.compiled_shapes()
        t0 = time.perf_counter()
        if part is not None:
            results = self._call(self._rows_step, self._params, state, part.astype(np.int32), ids[part], n[part],
                                 drafted[part], follow[part], q, controls)
            token, accepted, draft = (np.zeros(self.batch_size, a.dtype) for a in results[:3])
            for full, got in zip((token, accepted, draft), results[:3]):
                full[part] = fetch(got)
            q, state = results[3:]
        elif self.speculative:
            token, accepted, draft, q, state = self.verify(state, ids, n, drafted, follow, q, controls)
        else:
            token, _, state = self._run(state, ids, n, controls)
            token, accepted, draft = fetch(token), np.zeros(self.batch_size, bool), None
        seconds = time.perf_counter() - t0

        drawn = 0
        for b in np.flatnonzero(rows):
            s = slots[b]
            s.fed += int(n[b]) - int(drafted[b] and not accepted[b])  # a rejected draft is not kept
            if prefilling[b] and s.fed < len(s.request.prompt):
                continue
            before = len(s.out)
            if drafted[b]:
                s.drafted += 1
                if accepted[b]:
                    s.accepted += 1
                    s.emit(int(s.draft), on_token)
            s.emit(int(token[b]), on_token)
            s.check_until(before)
            drawn += len(s.out) - before
            s.pending = int(token[b])
            if self.speculative:
                s.draft = int(draft[b])
        if stats is not None:
            if prefilling.any():
                stats.prefill_seconds += seconds
            elif self.compiled_shapes() == compiled:
                stats.decode_seconds += seconds
                stats.decode_tokens += drawn
                stats.decode_steps += 1
        return state, q


def _batch_axes(state: dict) -> dict:
    """The batch axis of every array of a decode state (stacked layer caches: after the layer axis)."""
    axes = {"pos": 0, "layers": [[{k: 1 for k in unit} for unit in seg] for seg in state["layers"]]}
    if "mtp" in state:
        axes["mtp"] = {k: 0 for k in state["mtp"]}
    return axes


@jax.jit
def _slot_keys(seeds, indices):
    """[batch] seeds and request indices -> [batch] keys, each sequence_keys(seed, [index]) (one program
    for a whole batch's admissions, not a round of eager ops per request)."""
    return jax.vmap(lambda seed, index: sequence_keys(seed, index[None])[0])(seeds, indices)


def _settings(rows: Sequence[Sampling]):
    return (jnp.asarray([s.temperature for s in rows], jnp.float32),
            jnp.asarray([s.top_k for s in rows], jnp.int32),
            jnp.asarray([s.top_p for s in rows], jnp.float32))


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


class StopStrings:
    """`Request.until` for stop strings: whether the text decoded so far holds one of them (only
    the text new since the last call, and the few characters before it, are searched)."""

    def __init__(self, tokenizer, until: Sequence[str]):
        self.stream, self.until = TextStream(tokenizer), [u for u in until if u]
        self.reach = max(map(len, self.until), default=1) - 1  # a stop string may start this far back

    def __call__(self, tokens: Sequence[int]) -> bool:
        seen = len(self.stream.text)
        for token in tokens[len(self.stream.tokens):]:
            self.stream.push(token)
        tail = self.stream.text[max(0, seen - self.reach):]
        return any(u in tail for u in self.until)


def stop_tokens_of(ckpt: str | Path) -> list[int]:
    """eos_token_id of a checkpoint folder's generation_config.json or config.json (none if absent)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(ckpt) / name
        if path.is_file():
            try:
                raw = load_json_file(path)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}: not a JSON file: {e}") from None
            eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
            if eos is not None:
                eos = eos if isinstance(eos, list) else [eos]
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
                    raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, "
                                          f"got {json.dumps(raw['eos_token_id'])}")
                return eos
    return []
