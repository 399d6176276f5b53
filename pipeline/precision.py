"""Where bf16 pays off: the one fact about the hardware that the model, OTA and the frozen
encoder's passes all ask. It imports nothing of pipeline/, so OTA (and the targets stage
above it) need not stand on the BERTRAM model to ask it."""

from __future__ import annotations

import torch


def bf16_available(device) -> bool:
    """bf16 autocast pays off: a CUDA GPU, or a CPU with AMX / AVX-512 bf16 units."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
