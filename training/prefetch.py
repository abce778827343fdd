"""Training batches onto the device, the next one already on its way (CUDA), or straight (CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class DevicePrefetcher:
    """Hands out training batches (``(images, targets[, mask])``: every tensor of the tuple);
    on CUDA the copy runs one batch ahead.

    CUDA: `preload()` takes batch k+1 from the loader, pins it (uint8 images are a quarter of
    float's bytes) and copies it on a side stream while batch k computes; `take()` makes the
    compute stream wait for that copy (a stream dependency, not a host synchronisation).
    CPU: `take()` reads the loader directly and `preload()` does nothing: there is no copy to
    hide, and nothing runs ahead of the step.

    Because on CUDA one batch has left the loader before the step that uses it, a checkpoint
    must save `loader_state()` (the cursor from before the pending batch), not the loader's.
    """

    def __init__(self, fetch: Callable[[], tuple], device: torch.device,
                 state: Callable[[], Any] | None = None) -> None:
        self.fetch, self.device, self.state = fetch, device, state
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: tuple[torch.Tensor, ...] | None = None
        self._state_before: Any = None

    def take(self) -> tuple[torch.Tensor, ...]:
        """The next batch (on the device under CUDA; as the loader made it on CPU)."""
        if self.stream is None:
            return tuple(self.fetch())
        if self._pending is None:
            self.preload()
        assert self._pending is not None
        batch, self._pending = self._pending, None
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        # The tensors were allocated on the side stream: tell the allocator the compute stream
        # uses them, or their memory could be reused while the step still reads it.
        for t in batch:
            t.record_stream(current)
        return batch

    def preload(self) -> None:
        """CUDA: start copying the next batch (no-op on CPU, or when one is already pending)."""
        if self.stream is None or self._pending is not None:
            return
        self._state_before = self.state() if self.state is not None else None
        batch = self.fetch()
        with torch.cuda.stream(self.stream):
            self._pending = tuple(_pinned(t).to(self.device, non_blocking=True) for t in batch)

    def loader_state(self) -> Any:
        """The loader's cursor as of the batches handed out so far (what a checkpoint saves)."""
        if self._pending is not None:
            return self._state_before
        return self.state() if self.state is not None else None

    def reset(self) -> None:
        """Drop a pending batch (after the loader's cursor was restored)."""
        self._pending = None


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """`t` in page-locked memory (an asynchronous copy needs it); device tensors pass through."""
    return t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory()
