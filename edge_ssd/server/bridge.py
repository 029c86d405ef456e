"""The bridge between blocking generation and the event loop.

Generation is numpy/onnxruntime work that blocks, so each running request iterates its
`Stream` in a thread of its own, which posts the text pieces to the event loop through an
asyncio queue; the loop stays free for other clients, /health and /metrics.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Optional

log = logging.getLogger("edge_ssd.server")

TURN_POLL_S = 0.05  # how often a request waiting for the engine looks at its cancel flag


class GenerationThread:
    """One request's generation: a thread iterates the engine's Stream and posts to the loop.

    Events on `events`: ("piece", text), then ("done", Result or None when cancelled) or
    ("error", exception); ("gone", None) is posted by the connection watcher.
    """

    def __init__(self, stream, loop: asyncio.AbstractEventLoop, turn: threading.Lock):
        self.stream = stream
        self.loop = loop
        self.turn = turn  # held while this request uses the engine (see _take_turn)
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.ended = False  # the loop has seen the terminal event

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="edge-ssd-generate", daemon=True)
        self.thread.start()

    def _post(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancel.set()

    def _take_turn(self) -> bool:
        """Wait for the engine without starting to use it; False if the client left meanwhile.

        The engine's own lock is taken inside the stream's first step, which goes straight on
        to the prefill: a request waiting there (more slots than one engine) would still run
        its prefill after its client had gone. Waiting here first, and checking the cancel
        flag once the engine is free, means a gone client's request never starts.
        """
        while not self.cancel.is_set():
            if self.turn.acquire(timeout=TURN_POLL_S):
                if not self.cancel.is_set():
                    return True
                self.turn.release()
        return False

    def _run(self) -> None:
        if not self._take_turn():
            self._post(("done", None))
            return
        try:
            final = self._generate()
        finally:
            self.turn.release()
        if final[0] == "done" and not self.cancel.is_set():
            final = ("done", getattr(self.stream, "result", None))
        self._post(final)

    def _generate(self) -> tuple:
        """Iterate the stream until its end or a cancel; the terminal event to post."""
        it = iter(self.stream)
        final: tuple = ("done", None)
        try:
            for piece in it:
                if piece:  # an empty piece only marks a point to stop at (a long prompt's chunks)
                    self._post(("piece", piece))
                if self.cancel.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - reported to the request, never lost
            final = ("error", e)
        finally:
            try:
                it.close()  # a cancelled generation stops here and releases the engine's lock
            except Exception:  # noqa: BLE001
                log.exception("closing a generation failed")
        return final

    async def next(self) -> tuple:
        item = await self.events.get()
        if item[0] in ("done", "error"):
            self.ended = True
        return item

    async def finish(self) -> None:
        """Stop the generation (if running) and wait until its thread has let go of the engine."""
        self.cancel.set()
        if self.thread is None:
            return
        while not self.ended:
            try:
                await self.next()
            except asyncio.CancelledError:  # shutdown: the thread is a daemon and stops at its next round
                return


