"""Teacher and student language models behind one interface.

Both encoder-decoder (T5) and decoder-only (Llama/GPT-style) models are wrapped by :class:`LM`:

- ``start(prompt_ids, prompt_mask)``: a decoding state; nothing runs until the first ``extend``
  (so a teacher that is never called costs nothing, and its prompt is encoded together with the
  first tokens it has to catch up on: one forward);
- ``extend(state, tokens)``: feed ``n`` new output tokens through the KV cache and return the
  ``n + 1`` logit rows predicting output positions ``m .. m + n`` (``m`` = tokens fed before);
- ``rollback(state, n_keep, last_logits)``: drop cached tokens (speculative decoding);
- ``forward(prompt_ids, prompt_mask, outputs)``: teacher-forced logits over a given output.

Token conventions: the vocabulary V is the tokenizer's (``lm.vocab_size``); model output rows
beyond V (spare embedding rows) are never used as tokens. Prompts are ``[bos] + prompt + [eos]``
for decoder-only models (bos only where the tokenizer has one) and ``prompt + [eos]`` for the
encoder of encoder-decoder models; outputs end with EOS.

The :class:`Student` adds the ``<τ>`` action (token id ``tau_id``, a spare embedding row where
the model has one, else the embeddings are resized) and a zero-initialised scalar value head.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .atomic import make_tmp_dir, recover_dir, remove_dir, replace_dir

TAU_TOKEN = "<τ>"
STUDENT_META = "kdtw_student.json"
VALUE_HEAD_FILE = "value_head.safetensors"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model or tokenizer problem; the message says what to change."""


# ----------------------------------------------------------------------------- HF compatibility


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _crop(cache: Any, keep: int) -> None:
    remove = cache.get_seq_length() - keep
    if remove < 0:
        raise RuntimeError(f"cannot crop a cache of {cache.get_seq_length()} tokens to {keep}")
    if remove:
        cache.crop(-remove)  # negative = tokens to remove (both old and new transformers)


def fed_tokens(tokens: torch.Tensor, feed_last: bool) -> torch.Tensor:
    """The tokens `LM.extend_logp` feeds: all of them, or all but the last (scored only)."""
    n = tokens.shape[1]
    return tokens if feed_last or n == 0 else tokens[:, : n - 1]


# ----------------------------------------------------------------------------- LM wrapper


@dataclass
class DecodeState:
    """KV-cache state of one model over a batch. ``n_fed`` output tokens have been consumed;
    ``last_logits`` [B, Vm] predicts output position ``n_fed`` (None before the first extend)."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    cache: Any = None
    attn_mask: torch.Tensor | None = None  # decoder-only: [B, P + n_fed]
    encoder_outputs: Any = None  # encoder-decoder
    n_fed: int = 0
    last_logits: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None

    @property
    def started(self) -> bool:
        return self.last_logits is not None


class LM:
    """A `transformers` model with its tokenizer, decoding one token batch at a time."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, vocab_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.vocab_size = int(vocab_size if vocab_size is not None else len(tokenizer))
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < self.vocab_size:
            raise ModelError(
                f"model has {rows} output rows but the tokenizer has {self.vocab_size} tokens"
            )
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ModelError("the tokenizer has no eos_token; kdtw needs one to end outputs")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id = None if self.is_encoder_decoder else tokenizer.bos_token_id
        self._cache_kw = _cache_kwarg(model)

    # -- basics

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def encode_prompts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask [B, P] for prompt texts; left-padded (decoder-only needs it)."""
        if not texts:
            raise ModelError("no prompts to encode (empty input)")
        rows = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            rows.append(([self.bos_id] if self.bos_id is not None else []) + list(ids) + [self.eos_id])
        return self.pad_left(rows)

    def pad_left(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def decode(self, tokens: list[int]) -> str:
        toks = [t for t in tokens if t != self.eos_id and t < self.vocab_size]
        return self.tokenizer.decode(toks, skip_special_tokens=True).strip()

    # -- incremental decoding

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> DecodeState:
        return DecodeState(prompt_ids=prompt_ids, prompt_mask=prompt_mask)

    def _run(self, state: DecodeState, tokens: torch.Tensor, *, hidden: bool, first: bool):
        kw: dict[str, Any] = {"use_cache": True, "output_hidden_states": hidden}
        if first:
            from transformers.cache_utils import DynamicCache, EncoderDecoderCache

            state.cache = (
                EncoderDecoderCache(DynamicCache(), DynamicCache())
                if self.is_encoder_decoder
                else DynamicCache()
            )
        kw[self._cache_kw] = state.cache
        if self.is_encoder_decoder:
            if state.encoder_outputs is None:
                state.encoder_outputs = self.model.get_encoder()(
                    input_ids=state.prompt_ids, attention_mask=state.prompt_mask
                )
            dec = tokens
            if first:
                start_id = self.model.config.decoder_start_token_id
                start = torch.full((tokens.shape[0], 1), start_id, dtype=torch.long, device=tokens.device)
                dec = torch.cat([start, tokens], dim=1)
            out = self.model(
                encoder_outputs=state.encoder_outputs,
                attention_mask=state.prompt_mask,
                decoder_input_ids=dec,
                **kw,
            )
            hid = out.decoder_hidden_states[-1] if hidden else None
        else:
            n = tokens.shape[1]
            ones = torch.ones((tokens.shape[0], n), dtype=state.prompt_mask.dtype, device=tokens.device)
            if first:
                inp = torch.cat([state.prompt_ids, tokens], dim=1)
                state.attn_mask = torch.cat([state.prompt_mask, ones], dim=1)
                kw["logits_to_keep"] = n + 1
            else:
                inp = tokens
                state.attn_mask = torch.cat([state.attn_mask, ones], dim=1)
            pos = (state.attn_mask.cumsum(-1) - 1).clamp(min=0)[:, -inp.shape[1] :]
            out = self.model(input_ids=inp, attention_mask=state.attn_mask, position_ids=pos, **kw)
            hid = out.hidden_states[-1][:, -(n + 1 if first else n) :] if hidden else None
        state.cache = _cache_of(out)
        return out.logits, hid

    def extend(
        self, state: DecodeState, tokens: torch.Tensor, *, hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` [B, n] (n >= 0); return logits [B, n + 1, Vm] predicting output
        positions ``n_fed .. n_fed + n`` (and the matching last hidden states if asked)."""
        n = tokens.shape[1]
        first = not state.started
        if not first and n == 0:
            logits, hid = state.last_logits[:, None], (
                state.last_hidden[:, None] if state.last_hidden is not None else None
            )
        else:
            logits, hid = self._run(state, tokens, hidden=hidden, first=first)
            logits = logits.float()
            if not first:
                logits = torch.cat([state.last_logits[:, None], logits], dim=1)
                if hidden:
                    hid = torch.cat([state.last_hidden[:, None], hid], dim=1)
        state.n_fed += n
        state.last_logits = logits[:, -1]
        state.last_hidden = hid[:, -1] if hid is not None else None
        return (logits, hid) if hidden else logits

    def extend_logp(self, state: DecodeState, tokens: torch.Tensor, *, feed_last: bool = True,
                    close: bool = False, need: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Advance over ``tokens`` [B, n] and return their log-probs under this model, computed
        on the way: ``(logits [B, V] predicting the next position, log p(tokens) [B, n])``. With
        ``feed_last=False`` the last token is scored (from the logits that predict it) but not
        fed, and no next-position logits are returned: scoring a finished path this way computes
        each of its positions once. (Log-softmax over the tokenizer's ``vocab_size``, as
        `kdtw.rollout.score_batch` does.) ``close``: the state is not used again (see `close`).
        ``need`` ([B] bool): the rows whose next-position logits the caller reads; the others
        may come back as zeros (a remote teacher then sends only these rows; a local one
        ignores it)."""
        return self.scored(self.extend(state, fed_tokens(tokens, feed_last)), tokens, feed_last)

    def scored(self, logits: torch.Tensor, tokens: torch.Tensor,
               feed_last: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`extend_logp`'s answer from what `extend` returned for ``fed_tokens(tokens, feed_last)``."""
        logits = logits[..., : self.vocab_size].float()  # [B, m + 1, V]
        n = tokens.shape[1]
        logp = torch.log_softmax(logits[:, :n], -1).gather(-1, tokens[..., None].to(logits.device)).squeeze(-1)
        return (logits[:, -1] if feed_last else None), logp

    def extend_many(self, states: list[DecodeState], tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """`extend` of several decode states, in one forward where it can (a teacher replica
        answers the calls of many rollouts this way). Decoder-only states share a forward when
        they have not started (their prompt is fed with their tokens) or are fed at least one
        token: their caches are left-padded to one length and stacked (the padding masked; a state
        that has not started contributes only padding), their new inputs right-padded, and the
        cache split back after. The rest run alone. Returns what `extend` returns for each."""
        from transformers.cache_utils import DynamicCache

        def mergeable(st: DecodeState, t: torch.Tensor) -> bool:
            if self.is_encoder_decoder:
                return False
            if not st.started:
                return st.cache is None
            return (t.shape[1] > 0 and type(st.cache) is DynamicCache and st.attn_mask is not None
                    and st.cache.get_seq_length() == st.attn_mask.shape[1])

        out: list = [None] * len(states)
        group = [i for i, (st, t) in enumerate(zip(states, tokens)) if mergeable(st, t)]
        if len(group) < 2:
            group = []
        for i in range(len(states)):
            if i not in group:
                out[i] = self.extend(states[i], tokens[i])
        if not group:
            return out
        dev, pad = self.device, torch.nn.functional.pad
        new_ids, new_mask, lens = [], [], []
        for i in group:
            st, t = states[i], tokens[i].to(dev)
            ones = torch.ones(t.shape, dtype=st.prompt_mask.dtype, device=dev)
            if st.started:  # cache: prompt + fed outputs; new: the tokens
                lens.append(st.attn_mask.shape[1])
                new_ids.append(t)
                new_mask.append(ones)
            else:  # no cache; new: the (left-padded) prompt, then the tokens
                lens.append(0)
                new_ids.append(torch.cat([st.prompt_ids.to(dev), t], 1))
                new_mask.append(torch.cat([st.prompt_mask.to(dev), ones], 1))
        L, M = max(lens), max(x.shape[1] for x in new_ids)
        like = next((states[i].cache for i in group if states[i].started), None)
        cache = DynamicCache()
        for layer in range(len(like.layers) if like is not None else 0):
            ks, vs = [], []
            for i, n in zip(group, lens):
                if n:
                    ks.append(pad(states[i].cache.layers[layer].keys, (0, 0, L - n, 0)))
                    vs.append(pad(states[i].cache.layers[layer].values, (0, 0, L - n, 0)))
                else:
                    k = like.layers[layer].keys
                    ks.append(k.new_zeros((len(tokens[i]), k.shape[1], L, k.shape[3])))
                    vs.append(like.layers[layer].values.new_zeros((len(tokens[i]), k.shape[1], L, k.shape[3])))
            cache.update(torch.cat(ks), torch.cat(vs), layer)
        attn = torch.cat([torch.cat([pad(states[i].attn_mask, (L - n, 0)) if n else
                                     torch.zeros((len(tokens[i]), L), dtype=m.dtype, device=dev),
                                     pad(m, (0, M - m.shape[1]))], 1)
                          for i, n, m in zip(group, lens, new_mask)])
        inp = torch.cat([pad(x, (0, M - x.shape[1]), value=self.pad_id) for x in new_ids])
        pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, -M:]
        res = self.model(input_ids=inp, attention_mask=attn, position_ids=pos, use_cache=True,
                         **{self._cache_kw: cache})
        logits, merged = res.logits.float(), _cache_of(res)
        r = 0
        for i, n, x, m in zip(group, lens, new_ids, new_mask):
            st, B, w, k = states[i], len(tokens[i]), x.shape[1], tokens[i].shape[1]
            own = DynamicCache()
            for layer, lay in enumerate(merged.layers):
                own.update(lay.keys[r : r + B, :, L - n : L + w].clone(), lay.values[r : r + B, :, L - n : L + w].clone(), layer)
            st.cache = own
            st.attn_mask = torch.cat([st.attn_mask, m], 1) if n else m
            if n:
                full = torch.cat([st.last_logits[:, None], logits[r : r + B, :k]], 1)
            else:  # from the prompt's last position on
                full = logits[r : r + B, w - k - 1 : w]
            st.n_fed += k
            st.last_logits, st.last_hidden = full[:, -1], None
            out[i] = full
            r += B
        return out

    def close(self, state: DecodeState) -> None:
        """The decode ``state`` is no longer needed (a remote teacher frees its session)."""

    def rollback(self, state: DecodeState, n_keep: int, last_logits: torch.Tensor) -> None:
        """Keep the first ``n_keep`` fed output tokens; ``last_logits`` [B, Vm] predicts ``n_keep``."""
        if n_keep > state.n_fed:
            raise RuntimeError(f"rollback to {n_keep} > {state.n_fed} fed tokens")
        # the cache holds prompt + outputs (decoder-only) or start token + outputs (enc-dec)
        offset = 1 if self.is_encoder_decoder else state.prompt_ids.shape[1]
        _crop(state.cache, offset + n_keep)
        if state.attn_mask is not None:
            state.attn_mask = state.attn_mask[:, : state.prompt_ids.shape[1] + n_keep]
        state.n_fed = n_keep
        state.last_logits = last_logits
        state.last_hidden = None

    # -- teacher forcing

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        outputs: torch.Tensor,
        *,
        hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits [B, T, Vm] predicting ``outputs`` [B, T] (right-padded), one
        forward without a cache; with ``hidden`` also the last hidden states [B, T, H]."""
        T = outputs.shape[1]
        if self.is_encoder_decoder:
            start_id = self.model.config.decoder_start_token_id
            start = torch.full((outputs.shape[0], 1), start_id, dtype=torch.long, device=outputs.device)
            dec = torch.cat([start, outputs[:, : T - 1]], dim=1)
            out = self.model(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                decoder_input_ids=dec,
                use_cache=False,
                output_hidden_states=hidden,
            )
            logits = out.logits
            hid = out.decoder_hidden_states[-1] if hidden else None
        else:
            inp = torch.cat([prompt_ids, outputs[:, : T - 1]], dim=1)
            mask = torch.cat([prompt_mask, torch.ones_like(outputs[:, : T - 1])], dim=1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(
                input_ids=inp,
                attention_mask=mask,
                position_ids=pos,
                use_cache=False,
                output_hidden_states=hidden,
                logits_to_keep=T,
            )
            logits = out.logits
            hid = out.hidden_states[-1][:, -T:] if hidden else None
        return (logits, hid) if hidden else logits


# ----------------------------------------------------------------------------- student


class Student(nn.Module):
    """The student: an LM whose policy is over V ∪ {<τ>}, plus a scalar value head V_φ."""

    def __init__(self, lm: LM, tau_id: int, value_head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        self.model = lm.model  # registered, so .parameters() covers the LM and the head
        self.tau_id = int(tau_id)
        self.vocab_size = lm.vocab_size  # V (excludes <τ>)
        if value_head is None:
            value_head = nn.Linear(_hidden_size(lm.model.config), 1)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head.to(lm.device)
        # A learned offset on the <τ> logit (kept beside the value head): the spare row starts
        # random, so without it -log π(<τ>) starts near 11 nats and Phase 1 spends its first
        # hundreds of steps bending the shared hidden states; `calibrate_tau` sets it instead.
        self.tau_offset = nn.Parameter(torch.zeros((), device=lm.device))
        # Per-budget offsets on the <τ> logit (issue 11), added to the shared one: a budget's λ
        # moves its own calls without dragging its neighbours'. Set by `set_budgets`; the
        # budget of a row is found by its target fraction (decoding knows targets, not ids).
        self.budget_offsets = nn.Parameter(torch.zeros(0, device=lm.device))
        self.budget_targets: list[float] = []
        idx = list(range(self.vocab_size)) + [self.tau_id]
        self._contiguous = self.tau_id == self.vocab_size
        self.register_buffer("_policy_index", torch.tensor(idx, dtype=torch.long), persistent=False)

    def set_budgets(self, targets: list[float]) -> None:
        """Give the student one <τ> offset per budget (zeros), for the budget table ``targets``.
        A student that already has offsets for the same targets keeps them."""
        targets = [float(b) for b in targets]
        if targets == self.budget_targets:
            return
        with torch.no_grad():
            self.budget_offsets = nn.Parameter(torch.zeros(len(targets), device=self.lm.device))
        self.budget_targets = targets

    def budget_index(self, budgets: list[float] | torch.Tensor) -> torch.Tensor | None:
        """[B] index into ``budget_offsets`` of each target fraction (−1: not in the table), or
        None when the student has no per-budget offsets."""
        if not self.budget_targets:
            return None
        vals = torch.as_tensor(budgets, dtype=torch.float64).reshape(-1, 1)
        table = torch.tensor(self.budget_targets, dtype=torch.float64).reshape(1, -1)
        hit = (vals - table).abs() < 1e-9  # [B, K]
        return torch.where(hit.any(1), hit.to(torch.long).argmax(1), torch.full((vals.shape[0],), -1))

    def policy_logits(self, logits: torch.Tensor, budget_index: torch.Tensor | None = None) -> torch.Tensor:
        """[..., Vm] model logits -> [..., V+1] policy logits, <τ> last (index V).
        ``budget_index``: [B] (leading dim of ``logits``) rows' budgets for the per-budget offset
        (−1 or None: the shared offset only)."""
        if self._contiguous:
            pol = logits[..., : self.vocab_size + 1]
        else:
            pol = logits.index_select(-1, self._policy_index.to(logits.device))
        off = self.tau_offset.to(pol.dtype).expand(pol.shape[:-1])  # [...]
        if budget_index is not None and self.budget_offsets.numel():
            idx = budget_index.to(pol.device)
            per = torch.where(idx >= 0, self.budget_offsets[idx.clamp(min=0)], torch.zeros((), device=pol.device))
            off = off + per.to(pol.dtype).reshape(per.shape + (1,) * (pol.dim() - 2))
        return torch.cat([pol[..., :-1], pol[..., -1:] + off.unsqueeze(-1)], dim=-1)

    def detach_call_path(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, T, Vm] with the same values, whose <τ> column's gradient reaches the
        <τ> output row alone, not the body: the call decision is learned as a linear read-out of
        the body's features (``hidden`` [B, T, H], the last hidden states of ``LM.forward``)
        without bending them (train.bc_call_detach). A model that scales its hidden states before
        the head (T5 with tied embeddings) gives the row a constant factor on its gradient."""
        w = self.lm.model.get_output_embeddings().weight[self.tau_id]  # [H]
        z = hidden.detach().to(w.dtype) @ w  # [B, T], gradient into w only
        tau = logits[..., self.tau_id].detach() + (z - z.detach()).to(logits.dtype)
        out = logits.clone()
        out[..., self.tau_id] = tau
        return out

    @torch.no_grad()
    def calibrate_tau(self, logits: torch.Tensor, mask: torch.Tensor, target: float) -> float:
        """Set ``tau_offset`` so that the mean π(<τ>) over valid positions of ``logits``
        [B, T, Vm] is ``target`` (bisection); returns the offset."""
        valid = mask.bool()
        self.tau_offset.zero_()
        pol = self.policy_logits(logits.float())[valid]  # [N, V+1]
        lo, hi = -50.0, 50.0
        for _ in range(60):
            mid = (lo + hi) / 2
            p = torch.softmax(torch.cat([pol[:, :-1], pol[:, -1:] + mid], -1), -1)[:, -1].mean()
            lo, hi = (mid, hi) if p < target else (lo, mid)
        self.tau_offset.fill_((lo + hi) / 2)
        return float(self.tau_offset)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] last hidden states -> [B, T] values V_φ(s_t)."""
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def save(self, folder: str | os.PathLike) -> None:
        """A normal ``save_pretrained`` folder (tokenizer with <τ>, value head in safetensors),
        written to a temporary folder and swapped in (kdtw/atomic.py: a kill at any point leaves
        the old folder or the new one)."""
        from safetensors.torch import save_file

        folder = os.fspath(folder)
        recover_dir(folder)
        tmp = make_tmp_dir(folder)
        _quiet()
        try:
            self.lm.model.save_pretrained(tmp)
            self.lm.tokenizer.save_pretrained(tmp)
            heads = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
            heads["tau_offset"] = self.tau_offset.detach().reshape(1).cpu()
            if self.budget_targets:
                heads["budget_offsets"] = self.budget_offsets.detach().contiguous().cpu()
            save_file(heads, os.path.join(tmp, VALUE_HEAD_FILE))
            with open(os.path.join(tmp, STUDENT_META), "w") as f:
                json.dump({"tau_token": TAU_TOKEN, "tau_id": self.tau_id, "vocab_size": self.vocab_size,
                           "budget_targets": self.budget_targets}, f)
            replace_dir(tmp, folder)
        except BaseException:
            remove_dir(tmp)
            raise

    @classmethod
    def load(cls, folder: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu") -> "Student":
        folder = os.fspath(folder)
        recover_dir(folder)  # a save killed half-way leaves the old copy aside
        meta_path = os.path.join(folder, STUDENT_META)
        if not os.path.exists(meta_path):
            raise ModelError(
                f"{folder} is not a kdtw student folder (no {STUDENT_META}); to start a student "
                "from a plain model use student.source=pretrained with that folder"
            )
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            missing = [k for k in ("vocab_size", "tau_id") if k not in meta]
        except (ValueError, TypeError) as e:  # not JSON, or not an object
            missing, meta = [f"({type(e).__name__}: {e})"], {}
        if missing:
            raise ModelError(f"{meta_path} is not a kdtw student's metadata (missing {', '.join(missing)}): the "
                             "folder is corrupt; save the student again (or export it again from its run)")
        model, tok = _from_pretrained(folder, dtype=dtype, device=device)
        if tok.get_vocab().get(TAU_TOKEN) != meta["tau_id"]:  # e.g. a library default where the files were missing
            raise ModelError(f"the tokenizer in {folder} does not hold {TAU_TOKEN} at id {meta['tau_id']} (as "
                             f"{STUDENT_META} says): the folder is corrupt; save the student again")
        lm = LM(model, tok, vocab_size=meta["vocab_size"])
        from safetensors.torch import load_file

        head = nn.Linear(_hidden_size(model.config), 1)
        from safetensors import SafetensorError

        try:
            heads = load_file(os.path.join(folder, VALUE_HEAD_FILE))
        except (OSError, SafetensorError) as e:  # missing, or safetensors' own error for a truncated file
            raise ModelError(f"cannot read {os.path.join(folder, VALUE_HEAD_FILE)} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}): the folder is corrupt; save the "
                             "student again") from None
        offset = heads.pop("tau_offset", torch.zeros(1))
        per_budget = heads.pop("budget_offsets", None)
        head.load_state_dict(heads)
        student = cls(lm, meta["tau_id"], head)
        with torch.no_grad():
            student.tau_offset.fill_(float(offset[0]))
            targets = meta.get("budget_targets") or []
            if targets:
                if per_budget is None or per_budget.numel() != len(targets):
                    raise ModelError(f"{folder}: {STUDENT_META} names {len(targets)} budgets but "
                                     f"{VALUE_HEAD_FILE} has no matching budget_offsets; the folder is corrupt")
                student.set_budgets(targets)
                student.budget_offsets.copy_(per_budget.to(student.budget_offsets.device))
        return student


def make_student(model: nn.Module, tokenizer: Any) -> Student:
    """Add <τ> to a plain model + tokenizer: reuse a spare embedding row where the model has
    more rows than the tokenizer has tokens, else resize the embeddings by one row."""
    if TAU_TOKEN in tokenizer.get_vocab():
        raise ModelError(f"the tokenizer already contains {TAU_TOKEN}: load it with Student.load")
    vocab = len(tokenizer)
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(TAU_TOKEN, special=True, normalized=False)], special_tokens=True)
    tau_id = tokenizer.convert_tokens_to_ids(TAU_TOKEN)
    rows = model.get_input_embeddings().weight.shape[0]
    if tau_id >= rows:
        model.resize_token_embeddings(tau_id + 1, mean_resizing=False)
    return Student(LM(model, tokenizer, vocab_size=vocab), tau_id)


def _quiet() -> None:
    """No per-shard progress bars: kdtw prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _hidden_size(config: Any) -> int:
    for name in ("hidden_size", "d_model", "n_embd"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ModelError(f"cannot find the hidden size of a {type(config).__name__}")


# ----------------------------------------------------------------------------- loading


def _from_pretrained(name_or_path: str, *, dtype: str = "float32", device: str = "cpu", **kw):
    """``from_pretrained`` on a hub name or a local folder, picking the right auto class."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    recover_dir(name_or_path)  # a local folder whose replacement was killed: the old copy back (hub names: no-op)
    _quiet()
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load a model from {name_or_path!r}: {str(e).splitlines()[0]} "
            "(give a local folder with config.json, or a hub name where a hub is reachable)"
        ) from None
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    extra: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if device == "auto":
        extra["device_map"] = "auto"
    from safetensors import SafetensorError

    try:
        model = auto.from_pretrained(name_or_path, **extra, **kw)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # not memory or device errors
        _corrupt(name_or_path, "weights", e)
    tok = load_tokenizer(name_or_path, **kw)
    if device != "auto":
        model = model.to(device)
    return model.eval(), tok


def load_tokenizer(name_or_path: str, **kw):
    """``AutoTokenizer.from_pretrained`` on a hub name or a local folder (a folder whose tokenizer
    files are missing or broken: a ModelError naming it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError, KeyError) as e:
        _corrupt(name_or_path, "tokenizer", e)


def is_student_folder(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a kdtw student folder (`Student.save` writes its marker file there)."""
    return bool(path) and os.path.exists(os.path.join(path, STUDENT_META))


def check_weights(folder: str) -> None:
    """A local model folder's weights as far as they can be checked without loading them: a
    weights file there, each safetensors file's header readable and its tensors inside the file
    (a truncated copy fails here; the tensors' values are not read). A ModelError naming the
    folder otherwise."""
    import glob

    from safetensors import SafetensorError, safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files and not glob.glob(os.path.join(folder, "*.bin")):
        _corrupt(folder, "weights", FileNotFoundError("no *.safetensors or *.bin file"))
    for f in files:
        try:
            with safe_open(f, "pt"):
                pass
        except (OSError, SafetensorError) as e:
            _corrupt(folder, "weights", e)


def _corrupt(name_or_path: str, what: str, e: BaseException):
    """A local folder's truncated weights or missing tokenizer files surface as the libraries' own
    errors (a safetensors header error; "you need sentencepiece"): one ModelError naming the
    folder. A hub name keeps the library's own message."""
    if not os.path.isdir(name_or_path):
        raise e
    raise ModelError(
        f"cannot load the {what} in {name_or_path!r} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}): the folder is incomplete or corrupt; write it again "
        "(`kdtw pretrain --force` for its outputs, or save the model again)"
    ) from None


def load_lm(name_or_path: str, *, dtype: str = "float32", device: str = "cpu") -> LM:
    """A plain model (teacher, drafter) from a hub name or a local folder."""
    model, tok = _from_pretrained(name_or_path, dtype=dtype, device=device)
    return LM(model, tok)


def init_model(spec: Any, tokenizer: Any, *, seed: int = 0) -> nn.Module:
    """Random-init model from a ``ModelConfig`` spec, vocabulary from ``tokenizer`` (rounded up
    to a multiple of 64, as real checkpoints do: the spare rows hold <τ> for a student)."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    rows = ((len(tokenizer) + 1 + 63) // 64) * 64
    torch.manual_seed(seed)
    if spec.arch == "llama":
        cfg = LlamaConfig(
            vocab_size=rows,
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=spec.tie_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(cfg)
    elif spec.arch == "t5":
        cfg = T5Config(
            vocab_size=rows,
            d_model=spec.hidden_size,
            d_kv=spec.hidden_size // spec.num_heads,
            d_ff=spec.intermediate_size,
            num_layers=spec.num_layers,
            num_decoder_layers=spec.num_layers,
            num_heads=spec.num_heads,
            tie_word_embeddings=spec.tie_embeddings,
            decoder_start_token_id=tokenizer.pad_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
        )
        model = T5ForConditionalGeneration(cfg)
    else:
        raise ModelError(f"unknown arch {spec.arch!r}: use llama or t5")
    return model.to(_DTYPES[spec.dtype]).eval()


def check_tokenizers(teacher_tok: Any, student_tok: Any) -> None:
    """Teacher and student must share a tokenizer (the student's may add <τ>)."""
    t_vocab = teacher_tok.get_vocab()
    s_vocab = {k: v for k, v in student_tok.get_vocab().items() if k != TAU_TOKEN}
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:3]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:3]
        moved = [k for k in t_vocab if k in s_vocab and t_vocab[k] != s_vocab[k]][:3]
        raise ModelError(
            "teacher and student tokenizers differ "
            f"(teacher {len(t_vocab)} tokens, student {len(s_vocab)}; only in teacher: {only_t}, "
            f"only in student: {only_s}, different ids: {moved}). kdtw hands single tokens from "
            "the teacher to the student, so both must use the same tokenizer: pick a student of "
            "the teacher's model family or cut one from the teacher"
        )
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, name) != getattr(student_tok, name):
            raise ModelError(
                f"teacher and student tokenizers disagree on {name}: "
                f"{getattr(teacher_tok, name)} vs {getattr(student_tok, name)}"
            )


def encode_outputs(lm: LM, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Output token ids [B, T] (EOS appended, right-padded with pad) and mask [B, T]."""
    rows = [list(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + [lm.eos_id] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1.0
    return ids.to(lm.device), mask.to(lm.device)
