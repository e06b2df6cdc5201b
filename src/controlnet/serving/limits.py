"""What one request to the server may ask for. A module of its own so that the command line can
show the defaults without importing the models' libraries."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """Per-request limits of ``controlnet serve``; each one is a flag of that command."""

    max_megapixels: float = 1.5  # size of each output image
    max_upload_megapixels: float = 16.0  # size of each uploaded image
    max_upload_mb: float = 25.0  # bytes of each uploaded image file
    max_steps: int = 100
    max_samples: int = 8
    max_controls: int = 3
    max_queue: int = 64  # generations waiting; beyond this the server answers "busy"

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"limit {name} must be > 0, got {value}")
