"""The lm-evaluation-harness model `v4jax` (`pip install v4jax[lm-eval]`): loglikelihood,
loglikelihood_rolling and generate_until over a v4jax checkpoint, no server in between.

Text becomes tokens exactly as the harness's HF model (`HFLM`, lm-eval 0.4.13) does by
default, so a task scores the same through either on the same weights:
- `tok_encode`: the tokenizer's special tokens (DeepSeek's BOS) are added unless the string
  already starts with the BOS text (or `add_bos_token` says otherwise);
- a (context, continuation) pair moves the context's trailing spaces to the continuation,
  encodes context + continuation whole and takes the continuation as what follows the
  context's tokens; an empty context becomes the prefix token (BOS, else EOS);
- windows hold at most `max_length` input tokens (the context's oldest tokens go first), and a
  rolling document is [prefix] + its tokens, every token of it scored once;
- generation left-truncates the prompt to `max_length - max_gen_toks`, stops at the EOS token
  and cuts the decoded text at the first stop string; a sequence stops as soon as its text
  holds one (HFLM's stopping criteria), so the cut text is that of the full `max_gen_toks`.
A v4jax window is the input plus the one token after it, hence `max_length + 1` below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from v4jax import data, evaluate
from v4jax.errors import ConfigError
from v4jax.generate import Generator, Request, StopStrings, stop_tokens_of
from v4jax.runs import load_checkpoint
from v4jax.sampling import Sampling
from v4jax.sharding import make_mesh, use_rules

DEFAULT_MAX_LENGTH = 2048  # HFLM's, where the config names no position limit
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's


@register_model("v4jax")
class V4jaxLM(LM):
    """`lm-eval run --model v4jax --model_args ckpt=DIR[,dtype=float32,quant_sim=False,moe_impl=tiled,mesh=data=8]`.

    Scoring batches are planned by length (`evaluate.plan_batches`), whatever lm-eval's
    `batch_size`; generation runs `batch_size` prompts at a time ("auto": 8)."""

    def __init__(self, ckpt: str, dtype: str | None = None, quant_sim: bool = True, moe_impl: str | None = None,
                 mesh: str | None = None, max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 batch_size=1, add_bos_token: bool | None = None, prefix_token_id: int | None = None, seed: int = 0,
                 token_budget: int = evaluate.TOKEN_BUDGET, **_unused):  # lm-eval also passes device etc.
        super().__init__()
        self.mesh = make_mesh(mesh) if mesh else None
        self.model = load_checkpoint(ckpt, mesh=self.mesh, dtype=dtype, quant_sim=quant_sim, moe_impl=moe_impl)
        self.tokenizer = data.load_tokenizer(ckpt)
        if self.tokenizer is None:
            raise ConfigError(f"{ckpt}: lm-eval needs the checkpoint's tokenizer.json")
        cfg = self.model.cfg
        eos = stop_tokens_of(ckpt)
        if not eos:
            raise ConfigError(f"{ckpt}: names no eos_token_id (generation_config.json or config.json)")
        self.eot_token_id = eos[0]
        self.prefix_token_id = prefix_token_id if prefix_token_id is not None else (
            cfg.bos_token_id if cfg.bos_token_id is not None else self.eot_token_id)
        self.bos_text = self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
        self.max_length = int(max_length or cfg.max_position_embeddings or DEFAULT_MAX_LENGTH)
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.add_bos_token, self.seed, self.token_budget = add_bos_token, int(seed), int(token_budget)
        self.multiple = 1
        if self.mesh is not None:
            self.multiple = self.mesh.shape.get("data", 1)
        self.batch_size = -(-self.batch_size // self.multiple) * self.multiple

    # ------------------------------------------------------------------ tokens, as HFLM
    def tok_encode(self, string: str) -> list[int]:
        special = self.add_bos_token if self.add_bos_token is not None else True
        if self.bos_text and string.startswith(self.bos_text):
            special = False
        return self.tokenizer.encode(string, add_special_tokens=special).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            cont = self.tokenizer.encode(continuation, add_special_tokens=False).ids
            return ([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id else (cont[:1], cont[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ requests
    def _scores(self, windows: Sequence[evaluate.Window], n_rows: int) -> list[evaluate.Score]:
        batches = evaluate.plan_batches(windows, multiple=self.multiple, token_budget=self.token_budget)
        out: list[evaluate.Score] = [evaluate.Score(0.0, True, 0)] * n_rows
        with use_rules(self.mesh, "inference") if self.mesh is not None else contextlib.nullcontext():
            for row, s in evaluate.score(self.model, windows, batches):
                out[row] = s
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*r.args) for r in requests]
        windows = [evaluate.continuation_window(i, c, k, self.max_length + 1) for i, (c, k) in enumerate(pairs)]
        return [(s.loglikelihood, s.is_greedy) for s in self._scores(windows, len(pairs))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [[self.prefix_token_id, *self.tok_encode(r.args[0])] for r in requests]
        windows = [w for i, d in enumerate(docs) for w in evaluate.document_windows(i, d, self.max_length + 1)]
        return [s.loglikelihood for s in self._scores(windows, len(docs))]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests sharing generation settings run as one batched `Generator` call each."""
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        for rows in groups.values():
            kwargs = normalize_gen_kwargs(requests[rows[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise ConfigError(f"max_gen_toks {max_gen} leaves no prompt within max_length {self.max_length}")
            sampling = Sampling(float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                                int(kwargs.get("top_k", 0) or 0), float(kwargs.get("top_p", 1.0) or 1.0))
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):] for i in rows]
            gen = Generator(self.model, batch_size=min(self.batch_size, -(-len(prompts) // self.multiple)
                                                       * self.multiple),
                            max_len=max(map(len, prompts)) + max_gen, mesh=self.mesh)
            # a sequence ends, and frees its slot, as soon as its text holds a stop string
            queue = [Request(p, max_gen, sampling, frozenset([self.eot_token_id]), self.seed, k,
                             StopStrings(self.tokenizer, until)) for k, p in enumerate(prompts)]
            for k, completion in gen.serve(queue):
                text = self.tokenizer.decode(completion.tokens, skip_special_tokens=True)
                out[rows[k]] = postprocess_generated_text(text, until, None)
        return out

