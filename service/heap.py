"""Garbage collection in the server's long-lived processes.

Each process of the server (the main process, every HTTP process, every model worker)
holds several hundred thousand Python objects from start-up for as long as it runs:
torch, transformers, FastAPI, a tokenizer, a model. CPython's full collection
(generation 2) walks all of them, and it runs every few thousand requests. In an HTTP
process that is a pause of about 0.2 s with its event loop stopped, so every request it
holds waits, and the periodic pauses cost about a tenth of its CPU under load
(measured: 433,000 objects, 0.17-0.23 s per full collection on 2 cores).

``gc.freeze()`` moves every object alive at the end of start-up to the permanent
generation, which collections skip: full collections then walk only what was made
since (a few thousand objects, about 5 ms). This is what the ``gc`` documentation
offers servers for it; the objects frozen are those that live as long as the process
anyway.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("supportlens.heap")


def freeze_startup_heap(role: str) -> int:
    """Collect the garbage of start-up, then freeze what is left out of future
    collections; returns how many objects are frozen in this process."""
    gc.collect()  # start-up's garbage is freed now rather than kept forever
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("%s: %d start-up objects frozen out of garbage collection", role, frozen)
    return frozen
