"""Grouping texts into batches by a token budget, and running them with an out-of-memory back-off.

Texts are grouped in length order: packed rows hold at most ``max_tokens`` tokens, padded batches at most
``max_tokens`` padded tokens. A batch that runs out of memory is regrouped under half the budget. On a CPU
with several torch threads, batches run side by side, one per thread.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


def length_batches(
    lengths: Sequence[int], *, max_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Indices grouped longest first, each batch's padded size (rows x longest) within ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pack_batches(
    lengths: Sequence[int], *, max_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Indices grouped longest first, each group's total tokens within ``max_tokens`` (a packed row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or total + lengths[i] > max_tokens):
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches


def pad(input_ids: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for r, row in enumerate(input_ids):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[r, span] = torch.tensor(row, dtype=torch.long)
        mask[r, span] = 1
    return ids, mask


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed blocks of up to 32 MiB for reuse (returns whether it could).

    By default glibc hands large freed blocks back to the OS, so each layer's activations page-fault in
    afresh; keeping them, as tcmalloc and jemalloc do, read the shipped sample 1.07-1.23x faster on 2 CPU
    cores (bench/README.md). The process then holds its peak of one batch's activations. Process-wide, once.
    """
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc; musl has a stub
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def run_batches(
    costs: Sequence[int],
    run: Callable[[list[int]], None],
    max_tokens: int,
    max_batch_size: int | None,
    *,
    packing: bool,
    device: torch.device,
) -> None:
    """``run`` each length-sorted batch of item indices (packed rows when ``packing``, else padded batches); on
    out-of-memory, halve the budget and go on.

    A batch that fails writes nothing, so its items are simply batched again under the smaller
    budget (with a warning naming the budget to pass next time). One item alone that does not fit
    re-raises, naming its size. On a CPU, ``run`` may be called from several threads at once
    (:func:`_run_pending`).
    """
    if device.type == "cpu":
        retain_freed_memory()
    group = pack_batches if packing else length_batches
    pending = group(costs, max_tokens=max_tokens, max_batch_size=max_batch_size)
    while pending:
        failed = _run_pending(pending, run, device)
        if failed is None:
            return
        batch, error = failed
        if len(batch) == 1:
            raise torch.OutOfMemoryError(
                f"out of memory on a single text or pair ({costs[batch[0]]} tokens): lower "
                f"max_length, use a smaller dtype or a device with more memory ({error})"
            ) from error
        error.__traceback__ = None  # it holds the failed batch's tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
        size = sum(costs[i] for i in batch) if packing else len(batch) * max(costs[i] for i in batch)
        max_tokens = max(1, size // 2)
        logger.warning(
            "out of memory on a batch of %d (%d tokens): retrying with max_tokens_per_batch=%d "
            "(pass that to avoid the retries)",
            len(batch),
            size,
            max_tokens,
        )
        left = batch + [i for b in pending for i in b]
        regrouped = group([costs[i] for i in left], max_tokens=max_tokens, max_batch_size=max_batch_size)
        pending = [[left[j] for j in b] for b in regrouped]


def _run_pending(
    pending: list[list[int]], run: Callable[[list[int]], None], device: torch.device
) -> tuple[list[int], torch.OutOfMemoryError] | None:
    """Run the batches of ``pending``, removing each as it starts, until all ran or one ran out of memory:
    then the rest stay in ``pending`` and the failed batch is returned with its error.

    On a CPU with ``n > 1`` torch threads, ``n`` threads each run one batch at a time, every op single-threaded
    (torch releases the GIL inside ops): a small model's ops do not spread over threads well (SmolLM2 read the
    shipped sample 1.37x faster on 2 threads than on 1), while whole batches do (1.85x; bench/README.md). Each
    batch is computed as in a one-thread run, whichever thread takes it.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(pending) == 1:
        while pending:
            batch = pending.pop(0)
            try:
                run(batch)
            except torch.OutOfMemoryError as error:
                return batch, error
        return None
    lock = threading.Lock()
    failed: list[tuple[list[int], BaseException]] = []

    def work() -> None:
        while True:
            with lock:
                if failed or not pending:
                    return
                batch = pending.pop(0)
            try:
                run(batch)
            except BaseException as error:  # re-raised by the calling thread
                with lock:
                    failed.append((batch, error))
                return

    workers = [
        threading.Thread(target=work, name=f"legend-hf-{i}") for i in range(min(threads, len(pending)))
    ]
    torch.set_num_threads(1)  # a new thread takes the process-wide count at its first op
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    except BaseException:  # an interrupt: the workers finish their batch and stop
        with lock:
            failed.append(([], RuntimeError("interrupted")))
        raise
    finally:
        torch.set_num_threads(threads)
    errors = [e for _, e in failed if not isinstance(e, torch.OutOfMemoryError)]
    if errors:
        raise errors[0]
    out_of_memory = [(b, e) for b, e in failed if isinstance(e, torch.OutOfMemoryError)]
    for b, _ in out_of_memory[1:]:  # two batches ran out of memory at once: retry the second too
        pending.insert(0, b)
    return out_of_memory[0] if out_of_memory else None
