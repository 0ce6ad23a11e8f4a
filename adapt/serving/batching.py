"""Request batching for `dlm-adapt serve`: one model worker (a thread) takes requests from a bounded queue, decodes
those that arrived together and share their settings as one left-padded batch through `diffusion_generate`, and
hands each request its text pieces and its result on the server's event loop. The event loop never waits on the
model; the model never waits on a client."""

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..config.commands import SamplingOptions
from ..sampling import SamplingError

log = logging.getLogger("adapt.serving")


class QueueFull(Exception):
    """The queue holds --max-queue requests: answered 429."""


class Closed(Exception):
    """The server is shutting down: answered 503."""


@dataclass(eq=False)
class Job:
    """One request: its prompt ids and decoding settings, and the asyncio queue its events go to: ("delta", text),
    then ("done", result) or ("error", (status, message))."""

    ids: list[int]
    max_new_tokens: int | None
    sampling: SamplingOptions  # max_new_tokens travels apart
    seed: int | None
    stops: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the event loop (client gone, shutdown); the worker drops the row

    def key(self):
        """Requests share a batch when everything that decides a row's tokens besides its prompt is the same:
        max_tokens and every decoding option. A seeded request decodes alone: one generator drives a whole batch,
        so its draws would depend on the other rows."""
        return id(self) if self.seed is not None else (self.max_new_tokens, tuple(sorted(self.sampling.kwargs().items())))

    def send(self, kind: str, value):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening any more
            pass


class RowStreamer:
    """One row's streamer (`Stream`'s protocol): decodes the row's final tokens to text, sends the new text of each
    finished block (holding back what might begin a stop string or an unfinished character), and stops the row
    (`cancelled`) when a stop string appears or the client has gone."""

    def __init__(self, job: Job, tokenizer):
        self.job, self.tokenizer, self.tokens, self.sent, self.skipped_prompt = job, tokenizer, [], "", False
        self.stop_at = None  # the text's length up to its first stop string, once one appears

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled or self.stop_at is not None

    def put(self, ids):
        if not self.skipped_prompt:  # the protocol hands the prompt first
            self.skipped_prompt = True
            return
        self.tokens += ids.reshape(-1).tolist()
        text = self.text()
        hold = max((len(s) - 1 for s in self.job.stops), default=0)
        for s in self.job.stops:
            at = text.find(s)
            if at >= 0 and (self.stop_at is None or at < self.stop_at):
                self.stop_at = at
        if self.stop_at is not None:
            text, hold = text[: self.stop_at], 0
        ready = text[: len(text) - hold] if hold else text
        if ready.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            ready = ready.rstrip("\ufffd")
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.job.send("delta", ready[len(self.sent):])
            self.sent = ready

    def end(self):
        pass

    def text(self) -> str:
        eos = self.tokenizer.eos_token_id
        ids = self.tokens[: self.tokens.index(eos)] if eos in self.tokens else self.tokens
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Batcher:
    """The model worker. `submit` (event loop) queues a job or raises `QueueFull` / `Closed`; the worker thread
    groups up to `max_batch_size` queued jobs with the same `Job.key` (waiting `batch_wait` seconds for requests
    arriving together), decodes them, and sends each its events. `stats` is what /health shows."""

    def __init__(self, model, tokenizer, *, max_batch_size: int, max_queue: int, batch_wait: float):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.batch_wait = max_batch_size, max_queue, batch_wait
        self.queue: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self.running: list[Job] = []
        self.accepting, self.stopping = True, False
        self.stats = dict(requests_served=0, requests_failed=0, requests_cancelled=0, batches=0,
                          batched_requests=0, max_batch_size_seen=0, queued=0, running=0)
        self.thread = threading.Thread(target=self._work, name="dlm-adapt-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job):
        with self.lock:
            if not self.accepting:
                raise Closed()
            if len(self.queue) >= self.max_queue:
                raise QueueFull()
            self.queue.append(job)
            self.stats["queued"] = len(self.queue)
            self.lock.notify()

    def stop_accepting(self):
        with self.lock:
            self.accepting = False

    def close(self, timeout: float):
        """Stop: queued jobs are answered 503, running rows are cancelled (they stop at their next block), and the
        worker is given `timeout` seconds to finish."""
        with self.lock:
            self.accepting, self.stopping = False, True
            for job in self.queue:
                job.send("error", (503, "the server is shutting down"))
            self.queue.clear()
            for job in self.running:
                job.cancelled = True
            self.lock.notify()
        self.thread.join(timeout)

    def _work(self):
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._decode(batch)
            except Exception:  # a bug must not stop the server: every job of the batch gets a 500
                log.exception("decoding a batch of %d failed", len(batch))
                self.stats["requests_failed"] += len(batch)
                for job in batch:
                    job.send("error", (500, "internal error while decoding; see the server's log"))
            finally:
                with self.lock:
                    self.running = []
                    self.stats["running"] = 0

    def _next_batch(self) -> list[Job] | None:
        with self.lock:
            while not self.queue and not self.stopping:
                self.lock.wait()
            if self.stopping:
                return None
            deadline = time.monotonic() + self.batch_wait  # requests arriving together join this batch
            while len(self.queue) < self.max_batch_size and time.monotonic() < deadline and not self.stopping:
                self.lock.wait(deadline - time.monotonic())
            key, batch = self.queue[0].key(), []
            for job in list(self.queue):
                if job.cancelled:  # its client left while it waited
                    self.queue.remove(job)
                    self.stats["requests_cancelled"] += 1
                elif job.key() == key and len(batch) < self.max_batch_size:
                    self.queue.remove(job)
                    batch.append(job)
            self.running = batch
            self.stats.update(queued=len(self.queue), running=len(batch))
            return batch

    def _decode(self, batch: list[Job]):
        """Decode `batch` as one left-padded batch. Settings the sampler refuses only once the batch is built
        (e.g. a batch rounded up to blocks past the context) are retried one request at a time, so each request
        gets its own answer."""
        if not batch:
            return
        try:
            results = self._generate(batch)
        except SamplingError as e:
            if len(batch) > 1:
                for job in batch:
                    self._decode([job])
                return
            self.stats["requests_failed"] += 1
            batch[0].send("error", (400, str(e)))
            return
        self.stats["batches"] += 1
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], len(batch))
        if len(batch) > 1:
            self.stats["batched_requests"] += len(batch)
        for job, result in zip(batch, results):
            if job.cancelled:
                self.stats["requests_cancelled"] += 1
                continue
            self.stats["requests_served"] += 1  # before the answer: a client reading /health after it sees it
            job.send("done", result)

    def _generate(self, batch: list[Job]) -> list[dict]:
        tokenizer, first = self.tokenizer, batch[0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(job.ids) for job in batch)
        input_ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in batch])
        attention_mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in batch])
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(first.seed) if first.seed is not None else None
        streamers = [RowStreamer(job, tokenizer) for job in batch]
        out = self.model.diffusion_generate(
            input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=first.max_new_tokens,
            generator=generator, return_dict_in_generate=True, streamer=streamers, **first.sampling.kwargs())
        eos, results = tokenizer.eos_token_id, []
        for row, (job, streamer) in enumerate(zip(batch, streamers)):
            ids = out.sequences[row, width:].tolist()
            finished = eos is not None and eos in ids
            ids = ids[: ids.index(eos)] if finished else ids
            if streamer.stop_at is not None:  # stopped early: the row's tokens are the final ones it streamed
                ids, finished = [t for t in streamer.tokens if t != eos], True
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if streamer.stop_at is not None:
                text = text[: streamer.stop_at]
            if streamer.sent and text.startswith(streamer.sent) and len(text) > len(streamer.sent):
                job.send("delta", text[len(streamer.sent):])
            elif not streamer.sent and text:
                job.send("delta", text)
            nfe = int(out.row_nfe[row])
            results.append(dict(text=text, prompt_tokens=len(job.ids), completion_tokens=len(ids),
                                finish_reason="stop" if finished else "length", nfe=nfe,
                                tokens_per_forward=int(out.row_committed[row]) / max(1, nfe),
                                batch_size=len(batch)))
        return results
