"""Continuous batching: requests join and leave one running decode batch.

The engine owns the model and one batch KV cache of `max_batch` rows (kv_cache.py: rows are
left-padded, `valid` marks real slots, `next_pos` holds each row's next rotary position, and
`length`, the number of slots filled, is shared by all rows). One thread runs `step()` over and
over; each step
1. runs the calls queued with `call()` (the attention probe: nothing else runs meanwhile);
2. frees the rows of cancelled requests (a client that went away);
3. admits one waiting request, if a row is free (the cache widens, by powers of two up to
   `max_batch`, when all its rows are busy, and narrows again as rows free up, so a step
   costs what its busy rows need): its prompt is prefilled ALONE into a 1-row
   cache (reusing a cached prefix when one matches: prefix_cache.py), its first token sampled
   and sent, then its keys/values are spliced into the free row, right-aligned so they end at
   the batch's current `length`. A prompt longer than `length` first shifts every row right
   (a cached key already carries its rotary position, so moving slots changes nothing; the
   masks come from `valid`). Others wait one prefill, not a whole answer;
4. runs one decode step for the whole batch: each busy row feeds its last token, free rows
   feed padding that no one reads; each busy row samples with its own parameters (greedy
   and sampling rows side by side, a torch.Generator per seeded request), its text is cut into
   final pieces (TextStream) and sent; a row that meets EOS, a stop string or its token limit
   is freed (its keys/values offered to the prefix cache).
The cache's slots start small (`slots`, 256) and double, up to the context, as the rows grow:
when `length` reaches the cache's end, the columns no busy row uses (every row's left padding)
are dropped by shifting all rows left if they are a quarter of the cache or more, else the
slots double; with no busy row the cache restarts at 0 with its first size. A request is
accepted only if prompt + max_new_tokens fits max_len, so a row never outgrows the cache.

Each row computes what it would compute alone (same positions, its own keys only; only the order
of the fp32 sums in a product may differ with the batch's width), so greedy
answers equal `generate` one request at a time, token for token (tests/test_serve_engine.py).
Events reach the caller through `Job.on_event`, called in the engine's thread.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.kv_cache import ContextOverflowError, KVCache
from ..model.llava import LlavaModel
from .decode import SamplingParams, TextStream, sample
from .prefix_cache import PrefixCache

log = logging.getLogger(__name__)


@dataclass
class Event:
    """What a job hears: new final text (maybe ""), and on the last event why it ended:
    "stop" (EOS or a stop string), "length" (max_new_tokens), "cancelled" or "error"."""
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Job:
    prompt_ids: list[int]  # image tokens already expanded (processor.tokenize)
    params: SamplingParams
    pixel_values: torch.Tensor | None = None  # (N, 3, H, W): the prompt's images in order
    image_keys: tuple[str, ...] = ()  # digests of those images (image_digest), for the prefix cache
    on_event: Callable[[Event], None] | None = None
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks: a fixed amount of work per request)
    # filled in by the engine
    output_ids: list[int] = field(default_factory=list)  # sampled tokens, EOS excluded
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    cancelled: bool = False


@dataclass
class _Row:
    job: Job
    text: TextStream
    generator: torch.Generator | None
    last: int  # sampled, not yet in the cache
    fed: list[int] = field(default_factory=list)  # the ids this row's cache slots hold


def image_digest(pixel_values: torch.Tensor) -> str:
    """A digest of one preprocessed image (3, H, W): the prefix cache's name for it."""
    return hashlib.sha1(pixel_values.detach().float().cpu().numpy().tobytes()).hexdigest()


class BatchEngine:
    def __init__(self, model: LlavaModel, tokenizer, max_batch: int = 8, max_len: int | None = None,
                 prefix_entries: int = 8, slots: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        if slots < 1:
            raise ValueError(f"slots={slots}: must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        cfg = model.cfg
        self.max_len = min(max_len or cfg.text.max_position_embeddings, cfg.text.max_position_embeddings)
        self._max_batch = max_batch
        # the cache's slots start at `slots` and double as the rows need (up to max_len): a full-
        # context cache would be 377 MB per row for the default model, zeroed at every widening
        self._slots = min(slots, self.max_len)
        self.cache = model.new_cache(1, self._slots)  # its width follows the load (_fit), its slots the lengths (_room)
        self.rows: list[_Row | None] = [None]
        self.eos = set(cfg.text.eos_token_ids)
        self.pad = cfg.text.pad_token_id if cfg.text.pad_token_id is not None else 0
        self.prefixes = PrefixCache(prefix_entries, cfg.image_token_index, cfg.num_image_tokens)
        self.stats = collections.Counter()  # steps, prefills, tokens, shifts, compactions, grows, finish reasons
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the caller's side (any thread) ------------------------------------------------

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return sum(r is not None for r in self.rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> Job:
        need = len(job.prompt_ids) + job.params.max_new_tokens
        if not job.prompt_ids:
            raise ValueError("empty prompt")
        if job.params.repetition_penalty != 1.0:
            raise ValueError("the batch engine does not apply a repetition penalty")
        if need > self.max_len:
            raise ContextOverflowError(f"the prompt has {len(job.prompt_ids)} tokens and the answer may take "
                                       f"{job.params.max_new_tokens} more ({need}), but the context holds {self.max_len}")
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The job's row is freed at the next step (a waiting job is dropped before its prefill)."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() in the engine's thread between two steps; its result comes in the future."""
        fut: Future = Future()
        with self._wake:
            self._calls.append((fn, fut))
            self._wake.notify()
        if self._thread is None:  # no thread: run now (tests, scripts)
            self._run_calls()
        return fut

    def start(self) -> "BatchEngine":
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llava-core-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._calls or self.active):
                    self._wake.wait()
                if self._stopping:
                    break
            self.step()
        for job in [r.job for r in self.rows if r is not None] + list(self._waiting):  # they hear why
            job.finish_reason = "cancelled"
            self._send(job, Event(finish_reason="cancelled", error="the server is stopping"))
        self._waiting.clear()
        self.rows = [None] * len(self.rows)
        with torch.inference_mode():  # the cache's tensors were made under it
            self._reset()

    # --- the engine's side (its thread) ------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """One round: calls, cancellations, one admission, one decode step. False if idle."""
        ran = self._run_calls()
        self._free_cancelled()
        admitted = self._admit()
        if self.active:
            try:
                self._decode()
            except Exception as e:  # a bug: fail the batch, keep serving
                log.exception("decode step failed")
                for i, row in enumerate(self.rows):
                    if row is not None:
                        self._finish(i, row, "error", error=f"decode failed: {e}")
                self._reset()
            return True
        return ran or admitted

    def _run_calls(self) -> bool:
        ran = False
        while True:
            with self._wake:
                if not self._calls:
                    return ran
                fn, fut = self._calls.popleft()
            ran = True
            if fut.set_running_or_notify_cancel():
                try:
                    with torch.inference_mode():
                        fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)

    def _free_cancelled(self) -> None:
        for i, row in enumerate(self.rows):
            if row is not None and row.job.cancelled:
                self._finish(i, row, "cancelled")

    def _admit(self) -> bool:
        if self._waiting and self.active == len(self.rows) < self.max_batch:
            self._fit(self.active + 1)
        free = next((i for i, r in enumerate(self.rows) if r is None), None)
        with self._wake:
            while self._waiting and self._waiting[0].cancelled:
                self._send(self._waiting.popleft(), Event(finish_reason="cancelled"))
            if free is None or not self._waiting:
                return False
            job = self._waiting.popleft()
        try:
            one, logits = self._prefill(job)
            p = job.params
            gen = None if p.seed is None else torch.Generator(device=logits.device).manual_seed(p.seed)
            row = _Row(job, TextStream(self.tokenizer, p.stop_strings), gen, last=-1, fed=list(job.prompt_ids))
            self._splice(free, one)
            self.rows[free] = row  # placed before its first token is sent: a listener sees it active
            if self._take(row, int(sample(logits, p, None, gen)[0])):
                self._finish(free, row, job.finish_reason)
        except Exception as e:
            log.warning("request failed at admission: %s", e)
            if self.rows[free] is not None and self.rows[free].job is job:
                self.rows[free] = None
            self.cache.valid[free] = False
            job.finish_reason = "error"
            self._send(job, Event(finish_reason="error", error=str(e)))
        return True

    def _prefill(self, job: Job) -> tuple[KVCache, torch.Tensor]:
        """The prompt alone into a 1-row cache -> (cache, last logits (1, V))."""
        model, ids = self.model, job.prompt_ids
        one = model.new_cache(1, len(ids))
        keep = 0
        hit = self.prefixes.lookup(ids, job.image_keys)
        if hit is not None:
            keep, k, v = hit  # (L, Hkv, keep, D)
            one.k[:, 0, :, :keep] = k
            one.v[:, 0, :, :keep] = v
            one.valid[0, :keep] = True
            one.length, one.next_pos[0] = keep, keep
            job.cached_tokens = keep
        n_before = ids[:keep].count(model.cfg.image_token_index) // model.cfg.num_image_tokens
        px = None if job.pixel_values is None or n_before >= len(job.pixel_values) else job.pixel_values[n_before:]
        new = torch.tensor([ids[keep:]], device=model.device)  # (1, T - keep)
        embeds = model.embed(new, None if px is None else px.to(model.device, model.dtype))  # (1, T - keep, C)
        hidden = model.language_model(embeds, cache=one)
        self.stats["prefills"] += 1
        return one, model.logits(hidden[:, -1])  # (1, V)

    def _splice(self, r: int, one: KVCache) -> None:
        """Place a 1-row cache's T slots in row r, ending at the batch's current length."""
        T = one.length
        self._room(T)
        c = self.cache
        if T > c.length:
            self.stats["shifts"] += c.length > 0
            self._shift(T - c.length)
        start = c.length - T
        c.k[:, r, :, start:c.length] = one.k[:, 0, :, :T]
        c.v[:, r, :, start:c.length] = one.v[:, 0, :, :T]
        c.valid[r] = False
        c.valid[r, start:c.length] = True
        c.next_pos[r] = one.next_pos[0]

    def _shift(self, d: int) -> None:
        """Move every row's slots d to the right (d > 0) or -d to the left (d < 0)."""
        c, L = self.cache, self.cache.length
        if d > 0:
            c.k[:, :, :, d:d + L] = c.k[:, :, :, :L].clone()
            c.v[:, :, :, d:d + L] = c.v[:, :, :, :L].clone()
            c.valid[:, d:d + L] = c.valid[:, :L].clone()
            c.valid[:, :d] = False
        else:
            s = -d
            c.k[:, :, :, :L - s] = c.k[:, :, :, s:L].clone()
            c.v[:, :, :, :L - s] = c.v[:, :, :, s:L].clone()
            c.valid[:, :L - s] = c.valid[:, s:L].clone()
            c.valid[:, L - s:] = False
        c.length = L + d

    def _make_room(self) -> None:
        """The cache is full: drop the leading columns no busy row uses when they are a quarter of
        it or more (or it cannot grow), else double its slots."""
        c = self.cache
        used = c.valid[:, :c.length].any(0)  # (S,)
        first = int(used.float().argmax()) if bool(used.any()) else c.length
        if first < c.max_len // 4 and c.max_len < self.max_len:
            return self._room(c.length + 1)
        if first == 0:
            raise ContextOverflowError("the batch cache is full and no column is free (a row outgrew its limit)")
        self.stats["compactions"] += 1
        self._shift(-first)

    def _room(self, need: int) -> None:
        """Give the cache at least `need` slots (doubling, at most max_len)."""
        size = self.cache.max_len
        if need <= size:
            return
        while size < need:
            size *= 2
        self._rebuild(list(range(len(self.rows))), len(self.rows), min(size, self.max_len))
        self.stats["grows"] += 1

    def _rebuild(self, keep: list[int], width: int, slots: int) -> None:
        """A new cache of `width` rows and `slots` slots holding rows `keep` of the old one, first."""
        c, L = self.cache, self.cache.length
        new = self.model.new_cache(width, slots)
        if keep:
            idx = torch.tensor(keep, device=c.valid.device)
            n = len(keep)
            new.k[:, :n, :, :L] = c.k[:, idx, :, :L]  # (layers, n, Hkv, L, D)
            new.v[:, :n, :, :L] = c.v[:, idx, :, :L]
            new.valid[:n, :L] = c.valid[idx, :L]
            new.next_pos[:n] = c.next_pos[idx]
        new.length = L
        self.cache = new
        self.rows = [self.rows[i] for i in keep] + [None] * (width - len(keep))

    def _reset(self) -> None:
        if self.cache.max_len > self._slots:  # give back what a long answer grew
            self.cache = self.model.new_cache(len(self.rows), self._slots)
        self.cache.valid.zero_()
        self.cache.length = 0

    def _decode(self) -> None:
        c = self.cache
        if c.length >= c.max_len:
            self._make_room()
            c = self.cache
        busy = torch.tensor([[r is not None] for r in self.rows], device=c.valid.device)  # (B, 1)
        tokens = torch.tensor([r.last if r is not None else self.pad for r in self.rows],
                              device=self.model.device)  # (B,)
        embeds = self.model.language_model.embed_tokens(tokens[:, None])  # (B, 1, C)
        hidden = self.model.language_model(embeds, attention_mask=busy, cache=c)  # (B, 1, C)
        logits = self.model.logits(hidden[:, -1])  # (B, V)
        self.stats["steps"] += 1
        self.stats["max_active"] = max(self.stats["max_active"], self.active)
        greedy = logits.float().argmax(-1).tolist()  # (B,): one call for every greedy row
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            row.fed.append(row.last)
            p = row.job.params
            token = greedy[i] if p.greedy else int(sample(logits[i:i + 1], p, None, row.generator)[0])
            if self._take(row, token):
                self._finish(i, row, row.job.finish_reason)
        if not self.active:
            self._reset()
        if self.active <= len(self.rows) // 4:  # not at // 2: a join right after would widen it again
            self._fit(self.active)

    def _fit(self, need: int) -> None:
        """Give the batch cache the smallest width (a power of two, at most max_batch) that holds
        `need` rows, busy rows packed first: a step costs what its rows need, not max_batch."""
        width = 1
        while width < need:
            width *= 2
        width = min(width, self.max_batch)
        if width == len(self.rows):
            return
        busy = [i for i, r in enumerate(self.rows) if r is not None]
        self._rebuild(busy, width, self.cache.max_len)
        self.stats["resizes"] += 1

    def _take(self, row: _Row, token: int) -> bool:
        """Record a sampled token and send its text; True when the job is done (finish_reason set)."""
        job = row.job
        row.last = token
        self.stats["tokens"] += 1
        if token in self.eos and not job.ignore_eos:
            job.finish_reason = "stop"
            self._send(job, Event(row.text.finish(), "stop"))
            return True
        job.output_ids.append(token)
        piece = row.text.push(token)
        if row.text.stopped:
            job.finish_reason = "stop"
        elif len(job.output_ids) >= job.params.max_new_tokens:
            job.finish_reason = "length"
            piece += row.text.finish()
        if job.finish_reason:
            self._send(job, Event(piece, job.finish_reason))
            return True
        if piece:
            self._send(job, Event(piece))
        return False

    def _finish(self, i: int, row: _Row, reason: str | None, error: str | None = None) -> None:
        """Free row i; keep its keys/values for a later prompt that starts the same way."""
        c = self.cache
        job = row.job
        if reason in ("cancelled", "error"):
            job.finish_reason = reason
            self._send(job, Event(finish_reason=reason, error=error))
        slots = c.valid[i, :c.length].nonzero().reshape(-1)  # (n,) this row's slots, in order
        if reason in ("stop", "length") and len(slots) == len(row.fed):
            self.prefixes.add(row.fed, job.image_keys, c.k[:, i].index_select(2, slots),
                              c.v[:, i].index_select(2, slots))  # (L, Hkv, n, D) copies
        c.valid[i] = False
        self.rows[i] = None

    def _send(self, job: Job, event: Event) -> None:
        if event.finish_reason:
            self.stats[event.finish_reason] += 1
        if job.on_event is None:
            return
        try:
            job.on_event(event)
        except Exception:  # a listener that went away must not stop the batch
            log.exception("a job's on_event failed")
