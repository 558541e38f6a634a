"""The generation engine: continuous batching over one running batch, with prefix and feature reuse.

Between decoding steps, finished and cancelled requests leave the batch and waiting ones join it,
so a request never waits for others to finish. Each joining request is prefilled alone, but for its
prompt's last position, reusing the keys/values of the longest prompt prefix seen before (system
prompt, visual tokens, earlier turns); that last position rides the next decoding step with every
other row, which gives the request its first token. A request whose whole prompt but its last
position is cached (the same question again) thus joins without a forward of its own.
Keys and values are written in place (`infer.kv.RunningBatch`): a step's cost does not copy the cache.
A request's own fault (its prefill, its sampling, its row of a batched step) fails that request
alone; a cancelled request stops counting against the engine's limit at once.
The CLI, the HTTP server, the chat and the web demo all submit here.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from videollava.constants import IMAGE_SLOT, VIDEO_SLOT
from videollava.errors import VideoLlavaError
from videollava.infer.detokenize import IncrementalDecoder
from videollava.infer.kv import KVLayout, LayerKV, PrefixCache, RunningBatch, WindowCache, forward_with_cache
from videollava.infer.request import Completion, Detokenizer, Prepared, StreamDelta
from videollava.infer.sampling import SamplingFault, SamplingParams, pick_tokens
from videollava.model.videollava import VideoLlava


class QueueFullError(VideoLlavaError):
    """The engine's waiting queue is at its bound; the caller should retry later."""


class Handle:
    """A submitted request: iterate it for streamed deltas, or wait for the whole completion."""

    def __init__(self, request: _Request, on_cancel: Callable[[_Request], None]):
        self._request = request
        self._on_cancel = on_cancel
        self._events: queue.Queue[StreamDelta | Completion] = queue.Queue()
        self._done = threading.Event()
        self._completion: Completion | None = None

    def __iter__(self):
        while True:
            event = self._events.get()
            if isinstance(event, Completion):
                return
            yield event

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        assert self._completion is not None
        return self._completion

    def cancel(self) -> None:
        """Stop the request from any thread; its place in the engine's limit is free on return."""
        self._on_cancel(self._request)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _emit(self, delta: StreamDelta) -> None:
        self._events.put(delta)

    def _finish(self, completion: Completion) -> None:
        self._completion = completion
        self._events.put(completion)
        self._done.set()


@dataclass(eq=False)  # compared by identity: the queue removes this very request
class _Request:
    prepared: Prepared
    params: SamplingParams
    cache_salt: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    handle: Handle | None = None
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    decoder: IncrementalDecoder | None = None  # the answer's text so far, eos left out
    sent_chars: int = 0  # characters of the stripped answer already streamed
    answer_start: int = 0  # where the stripped answer starts in the decoded text
    next_position: int = 0  # position of the next input: the prompt's last, then each token generated
    # (hidden,) input of the request's first decoding step: its prompt's last position
    first_input: torch.Tensor | None = None
    first_token_at: float | None = None
    reused: int = 0
    finish_reason: str | None = None
    fault: Exception | None = None  # why a request marked finish_reason "error" failed
    final_text: str | None = None
    holds_slot: bool = True  # counted in Engine._held; under Engine._lock
    completed: bool = False  # its Completion was handed out; under Engine._lock


@dataclass
class EngineStats:
    requests_total: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    latency_seconds_sum: float = 0.0
    busy_seconds: float = 0.0


class LoopRunningError(VideoLlavaError):
    """`step()` was called while the engine's own loop thread drives it: two drivers would race."""


class LoadedModel(Protocol):
    """What `Engine.for_pipeline` reads from a pipeline: the model and how to turn its ids into text."""

    model: VideoLlava
    detokenizer: Detokenizer


class Engine:
    """One scheduling loop per engine, driven either by its own thread or by the caller, never both.

    `start()` runs the loop in a background thread (servers). Without it, `generate()` takes the
    loop's turns in the calling thread until its requests are done, and tests or benchmarks may take
    single turns with `step()`. Turns never overlap: a caller that finds the loop thread running
    waits on it instead, and `step()` refuses.
    """

    def __init__(
        self,
        model: VideoLlava,
        detokenizer: Detokenizer,
        max_batch_size: int = 16,
        max_queue: int = 64,
        prefix_cache_bytes: int = 1024**3,
    ):
        self.model = model
        self.detokenizer = detokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.stats = EngineStats()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._held = 0  # submitted, neither finished nor cancelled: waiting, being prefilled or running
        self._batch = RunningBatch(
            KVLayout.of(model.language_model, model.device),
            max_rows=max_batch_size,
            max_columns=model.max_context + 1,
        )
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)  # notified when _held drops or the loop stops
        self._turn_lock = threading.Lock()  # held for the whole of every turn, whoever takes it
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None  # set and cleared under _turn_lock
        self._stop = False

    @classmethod
    def for_pipeline(cls, pipeline: LoadedModel, **options) -> Engine:
        """An engine for a loaded pipeline's model and detokenizer; `options` as for the constructor."""
        return cls(pipeline.model, pipeline.detokenizer, **options)

    # ------------------------------------------------------------ public API

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(
        self, prepared: Prepared, params: SamplingParams | None = None, *, cache_salt: str | None = None
    ) -> Handle:
        """Refused only when max_queue requests would wait behind a full batch.

        Counting every request held, not just the waiting ones, keeps the limit the same whether or not
        the scheduling thread has yet moved earlier requests from the queue into free batch slots.
        Requests with different `cache_salt`s never share prefix-cache entries (None shares with None).
        """
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise VideoLlavaError(f"cache_salt must be a non-empty string, got {cache_salt!r:.80}")
        params = params or SamplingParams()
        request = _Request(
            prepared=prepared, params=params, cache_salt=cache_salt, generator=params.generator()
        )
        request.handle = Handle(request, self._cancel)
        with self._lock:
            if self._held >= self._capacity:
                raise QueueFullError(
                    f"the engine holds {self._held} requests (at most {self.max_batch_size} running "
                    f"and {self.max_queue} waiting); try again later"
                )
            self._held += 1
            self._waiting.append(request)
        self._wake.set()
        return request.handle

    def start(self) -> Engine:
        """Run the scheduling loop in a background thread (for servers)."""
        with self._turn_lock:  # a caller in the middle of a turn finishes it first
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._loop, name="videollava-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop thread; callers of `generate` waiting on it go on driving the loop themselves."""
        self._stop = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join()
            with self._turn_lock:
                self._thread = None
            with self._lock:
                self._slot_freed.notify_all()

    def generate(
        self, prepared: list[Prepared], params: list[SamplingParams] | SamplingParams | None = None
    ) -> list[Completion]:
        """Run a list of requests to completion, in continuous batches, as a client of the loop.

        Requests are submitted as the engine has room for them. While the loop thread runs, the
        caller only waits; otherwise it takes the loop's turns itself until its requests are done.
        """
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prepared)
        pending = deque(zip(prepared, params, strict=True))
        handles: list[Handle] = []
        while True:
            while pending:
                try:
                    handles.append(self.submit(*pending[0]))
                except QueueFullError:
                    break
                pending.popleft()
            if not pending and all(h.done for h in handles):
                return [h.result() for h in handles]
            if not self._take_turn():
                self._wait_on_loop(handles, room_wanted=bool(pending))

    def step(self) -> None:
        """Take one turn of the loop in the calling thread, for callers that drive the engine themselves.

        Refused while the loop thread runs: the caller would race it over the running batch.
        """
        with self._turn_lock:
            if self._thread is not None:
                raise LoopRunningError(
                    "this engine's scheduling loop runs in its own thread (Engine.start); submit requests "
                    "and wait on their handles, or call generate(), instead of calling step()"
                )
            self._step()

    # ------------------------------------------------------------ scheduling

    @property
    def _capacity(self) -> int:
        return self.max_queue + self.max_batch_size

    def _loop(self) -> None:
        while not self._stop:
            if not self._running and not self._waiting:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            with self._turn_lock:
                self._turn()

    def _take_turn(self) -> bool:
        """One turn in the calling thread, unless the loop thread drives the engine (then False)."""
        with self._turn_lock:
            if self._thread is not None:
                return False
            self._turn()
            return True

    def _wait_on_loop(self, handles: list[Handle], room_wanted: bool) -> None:
        """Sleep until the loop thread frees a place (when one is wanted), finishes `handles`, or stops."""

        def settled() -> bool:
            return (
                self._thread is None
                or (room_wanted and self._held < self._capacity)
                or all(h._request.completed for h in handles)
            )

        with self._lock:
            self._slot_freed.wait_for(settled)

    def _turn(self) -> None:
        """A step whose own faults are contained: the loop goes on, whoever drives it. Under _turn_lock."""
        try:
            self._step()
        except Exception as error:
            self._fail_running(error)

    def _fail_running(self, error: Exception) -> None:
        """Last resort for a fault of the engine's own code while stepping; a request's never get here.

        The running batch's state is then unknown, so its requests fail; waiting ones have not been
        touched and join a fresh batch at the next step, so no client is left waiting on a broken one.
        """
        for request in self._running:
            self._fail(request, error)
        self._running = []
        self._batch.clear()

    def _cancel(self, request: _Request) -> None:
        """Called by Handle.cancel from any thread: the slot is released now, not at the next step."""
        with self._lock:
            if request.completed:
                return
            request.cancelled = True
            self._release_slot(request)
            waiting = request in self._waiting
            if waiting:
                self._waiting.remove(request)
        if waiting:  # no step will see it again: its caller hears at once
            self._finish(request, "cancelled", layers=None)
        # A running request leaves the batch at the next step.
        self._wake.set()

    @torch.inference_mode()
    def _step(self) -> None:
        """Admit waiting requests, then advance every running request by one token. Under _turn_lock."""
        started = time.perf_counter()
        self._retire()  # cancelled requests leave before new ones take their rows
        while len(self._running) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            if request.cancelled:
                self._finish(request, "cancelled", layers=None)
                continue
            try:
                self._prefill(request)
            except Exception as error:  # one bad request must not stop the others
                self._fail(request, error)
        self._retire()
        if self._running:
            self._decode()
        self.stats.busy_seconds += time.perf_counter() - started

    def _prefill(self, request: _Request) -> None:
        """Write a request's prompt but its last position into a free row of the batch, then count it in.

        The longest cached prefix is copied in, a forward writes the rest in place; the prompt so far
        goes to the prefix cache (copied, when stored). The last position is the row's first input.
        """
        prepared = request.prepared
        spliced = self.model.splice([prepared.input_ids], [prepared.features])
        total = spliced.lengths[0]
        length = total - 1  # positions written now; the last one is the first decoding step's input
        rows_of = _rows_per_key(prepared.input_ids, [f.shape[0] for f in prepared.features])
        reused, past = self.prefix_cache.longest(
            prepared.prefix_key, max_rows=length, salt=request.cache_salt
        )
        self._batch.reserve(length)
        try:
            if past is not None:
                self._batch.write_prefix(past)
            if length > reused:
                embeds = spliced.inputs_embeds[:, reused:length]  # (1, length - reused, hidden)
                forward_with_cache(
                    self.model.language_model.get_decoder(),  # no output head: no logits wanted here
                    self._batch.joining_cache(filled=reused),
                    inputs_embeds=embeds,
                    attention_mask=torch.ones(1, length, dtype=torch.bool, device=embeds.device),
                    position_ids=torch.arange(reused, length, device=embeds.device)[None],
                )
                # The prompt's key elements that the written positions cover whole serve later requests.
                covered, positions = 0, 0
                while covered < len(rows_of) and positions + rows_of[covered] <= length:
                    positions += rows_of[covered]
                    covered += 1
                if positions > reused:
                    self.prefix_cache.put(
                        prepared.prefix_key[:covered],
                        rows_of[:covered],
                        self._batch.joining_layers(positions),
                        salt=request.cache_salt,
                        copy=True,
                    )
        except BaseException:
            self._batch.abort()
            raise
        self._batch.admit()
        request.reused = reused
        request.next_position = length
        request.first_input = spliced.inputs_embeds[0, length].clone()  # (hidden,)
        self._running.append(request)
        self.stats.prompt_tokens += total

    def _decode(self) -> None:
        """One token for every running row; a row at fault fails alone, the others go on."""
        device = self.model.device
        last = torch.tensor(
            [[r.generated[-1] if r.generated else 0] for r in self._running], device=device
        )  # (B, 1); a row that has no token yet takes its prompt's last position below instead
        embeds = self.model.language_model.get_input_embeddings()(last)  # (B, 1, hidden)
        for row, request in enumerate(self._running):
            if request.first_input is not None:
                embeds[row, 0] = request.first_input
        positions = torch.tensor([[r.next_position] for r in self._running], device=device)  # (B, 1)
        mask = self._batch.step_mask()  # (B, L + 1): the new token's column included
        try:
            logits = self._forward_step(self._batch.step_cache(), embeds, positions, mask)
        except Exception as error:
            # The failed forward may have written some layers' new column: uncounted, it is just unused.
            self._settle_step_fault(error, embeds, positions)
            return
        self._batch.commit()
        tokens = pick_tokens(logits, [r.params for r in self._running], [r.generator for r in self._running])
        for row, (request, token) in enumerate(zip(self._running, tokens, strict=True)):
            request.next_position += 1
            request.first_input = None
            if request.finish_reason is not None:
                continue
            if isinstance(token, SamplingFault):
                request.finish_reason, request.fault = "error", token
            else:
                self._accept_or_mark(row, token)
        self._retire()

    def _forward_step(
        self, cache: WindowCache, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One decoding step of the rows in `cache`: (B, 1, hidden) inputs -> (B, V) next-token logits."""
        output = forward_with_cache(
            self.model.language_model,
            cache,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
        )
        return output.logits[:, -1]

    def _settle_step_fault(self, error: Exception, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        """The batched step raised: step each row alone to tell a request's own fault from a shared one.

        Rows that fail alone fail; the others keep their state and take this step again with the next
        batch. When every row steps alone the fault belongs to the batch (memory, device), and the
        running requests fail; waiting ones are untouched.
        """
        faulty = 0
        for row, request in enumerate(self._running):
            cache, length = self._batch.row_cache(row)  # writes only the uncounted column
            alone_mask = torch.ones(1, length + 1, dtype=torch.bool, device=embeds.device)
            try:
                self._forward_step(cache, embeds[row : row + 1], positions[row : row + 1], alone_mask)
            except Exception as row_error:
                request.finish_reason, request.fault = "error", row_error
                faulty += 1
        if faulty == 0:
            for request in self._running:
                request.finish_reason, request.fault = "error", error
        self._retire()

    def _accept_or_mark(self, row: int, token: int) -> None:
        """Accept a token; a fault while doing so (decoding its text, say) marks that request failed."""
        try:
            self._accept(row, token)
        except Exception as error:
            request = self._running[row]
            request.finish_reason, request.fault = "error", error

    def _accept(self, row: int, token: int) -> None:
        """Record one new token of a running request; mark it finished when it should stop."""
        request = self._running[row]
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
        params = request.params
        if token == self.detokenizer.eos_token_id:
            request.finish_reason = "stop"
            request.generated.append(token)
            self._flush_text(request, final=True)
            return
        request.generated.append(token)
        self.stats.tokens_generated += 1
        decoder = self._decoder(request)
        stable = len(decoder.text)  # text that no later token changes, already searched for stops
        decoder.push(token)
        if params.stop:
            # A stop string not found before ends after the stable text: search only where it could start.
            start = max(0, stable - max(len(s) for s in params.stop) + 1)
            window = decoder.text[start:] + decoder.pending
            for stop in params.stop:
                at = window.find(stop)
                if at != -1:
                    request.finish_reason = "stop"
                    self._flush_text(request, final=True, end=start + at)
                    return
        if (
            len(request.generated) >= params.max_new_tokens
            or request.next_position + 1 >= self.model.max_context
        ):
            request.finish_reason = "length"
            self._flush_text(request, final=True)
            return
        self._flush_text(request, final=False)

    def _decoder(self, request: _Request) -> IncrementalDecoder:
        if request.decoder is None:
            request.decoder = IncrementalDecoder(self.detokenizer)
        return request.decoder

    def _flush_text(self, request: _Request, final: bool, end: int | None = None) -> None:
        """Stream the answer decoded so far, stripped of surrounding whitespace.

        Leading whitespace is never sent. Trailing whitespace, an incomplete multi-byte character and
        what could still turn into a stop string wait for more text; at the end trailing whitespace is
        dropped. So the deltas add up to the stripped answer. Positions count characters of the whole
        decoded text (`end`: where a stop string cuts it), so only the unsent tail is looked at.
        """
        decoder = self._decoder(request)
        total = len(decoder.text) + len(decoder.pending) if end is None else end
        if request.sent_chars:
            sent_to = request.answer_start + request.sent_chars
            unsent = (decoder.text[sent_to:] + decoder.pending)[: max(0, total - sent_to)]
        else:  # nothing but whitespace or unsettled text yet: where the answer starts may still move
            unsent = (decoder.text + decoder.pending)[:total].lstrip()
            request.answer_start = total - len(unsent)
        # Pending text may still change (an unfinished character, a run of bytes): it waits for the end.
        settled = unsent if final else unsent[: max(0, len(decoder.text) - (total - len(unsent)))]
        if not final and request.params.stop:
            settled = settled[: max(0, len(unsent) - max(len(s) for s in request.params.stop) + 1)]
        # Whitespace last, after the stop-string cut: what precedes a stop string may end the answer.
        ready = len(settled.rstrip())
        if ready > 0:
            assert request.handle is not None
            request.handle._emit(StreamDelta(unsent[:ready], request.generated[-1]))
            request.sent_chars += ready
        if final:
            start = request.answer_start
            request.final_text = (decoder.text + decoder.pending)[start : start + request.sent_chars]

    def _retire(self) -> None:
        """Take finished, failed and cancelled requests out of the batch and hand out their completions."""
        leaving: list[int] = []
        for row, request in enumerate(self._running):
            if request.finish_reason is None and not request.cancelled:
                continue
            leaving.append(row)
            try:
                if request.finish_reason == "error":
                    self._fail(request, request.fault or RuntimeError("unknown fault"))
                    continue
                # Finished answers, cut off or not, serve follow-up questions from the prefix cache.
                layers = self._batch.row_layers(row) if request.finish_reason in ("stop", "length") else None
                self._finish(request, request.finish_reason or "cancelled", layers)
            except Exception as error:  # finishing one request must not stop the others
                self._fail(request, error)
        if leaving:
            order = self._batch.remove(leaving)  # the last rows move into the holes
            self._running = [self._running[i] for i in order]

    def _finish(self, request: _Request, reason: str, layers: list[LayerKV] | None) -> None:
        prepared = request.prepared
        if layers is not None and len(request.generated) > 1:
            # The conversation so far (prompt + answer but its last token) serves the next turn.
            answer = request.generated[:-1]
            rows_of = _rows_per_key(prepared.input_ids, [f.shape[0] for f in prepared.features]) + [1] * len(
                answer
            )
            # `layers` are views of the running batch's buffers: stored, they are copied.
            self.prefix_cache.put(
                prepared.prefix_key + answer, rows_of, layers, salt=request.cache_salt, copy=True
            )
        now = time.perf_counter()
        text = request.final_text
        if text is None:
            decoder = request.decoder
            text = (decoder.text + decoder.pending).strip() if decoder is not None else ""
        self._complete(
            request,
            Completion(
                text=text,
                token_ids=request.generated,
                prompt_tokens=prepared.prompt_tokens,
                visual_tokens=prepared.visual_tokens,
                finish_reason=reason,
                seconds=now - request.submitted,
                first_token_seconds=(request.first_token_at - request.submitted)
                if request.first_token_at
                else None,
                reused_prefix_tokens=request.reused,
            ),
        )

    def _fail(self, request: _Request, error: Exception) -> None:
        if isinstance(error, SamplingFault):
            client_error = error.client_message
        elif isinstance(error, VideoLlavaError):  # written for users: it names their input's problem
            client_error = str(error)
        else:
            client_error = "the server failed while generating this answer"
        self._complete(
            request,
            Completion(
                text="",
                token_ids=[],
                prompt_tokens=request.prepared.prompt_tokens,
                visual_tokens=request.prepared.visual_tokens,
                finish_reason="error",
                seconds=time.perf_counter() - request.submitted,
                first_token_seconds=None,
                reused_prefix_tokens=0,
                error=f"{type(error).__name__}: {error}",
                client_error=client_error,
            ),
        )

    def _complete(self, request: _Request, completion: Completion) -> None:
        """Hand a request its completion exactly once, however finishing, failing and cancelling race."""
        with self._lock:
            if request.completed:
                return
            request.completed = True
            self._release_slot(request)
            self.stats.requests_total += 1
            if completion.finish_reason == "error":
                self.stats.requests_failed += 1
            else:
                self.stats.latency_seconds_sum += completion.seconds
        assert request.handle is not None
        request.handle._finish(completion)

    def _release_slot(self, request: _Request) -> None:
        """Caller holds self._lock."""
        if request.holds_slot:
            request.holds_slot = False
            self._held -= 1
            self._slot_freed.notify_all()


def _rows_per_key(input_ids: list[int], block_rows: list[int]) -> list[int]:
    """How many cache positions each prompt position key covers: 1 per token, a block per media slot."""
    blocks = iter(block_rows)
    return [next(blocks) if t in (IMAGE_SLOT, VIDEO_SLOT) else 1 for t in input_ids]
