"""Random crop with zero padding and, only when asked, a horizontal flip, for a whole batch at once.

The reference O2U-Net trains every stage with crop + flip augmentation. A flip can change a class
(text, digits, arrows), and on real label noise no augmentation ranked best, so the default is
`none` and `crop_flip` runs only when the caller says the classes are mirror-invariant. Doing it
as one gather on the device, with the run's own `torch.Generator`, keeps the data on the
accelerator and makes the draws part of the checkpointed random state, like airbench's
batch-level augmentation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_padding(image_size: int) -> int:
    """Pixels of zero padding for the random crop: 4 px at 32 px, as for CIFAR, scaled with size."""
    return max(1, round(image_size / 8))


def augment_batch(
    images: torch.Tensor, augmentation: str, padding: int, generator: torch.Generator
) -> torch.Tensor:
    """`images` augmented as `augmentation` says: none (as given), crop, or crop_flip."""
    if augmentation == "none":
        return images
    return random_crop_flip(images, padding, generator, flip=augmentation == "crop_flip")


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator, *, flip: bool = True
) -> torch.Tensor:
    """A random `H x W` window of each zero-padded image, mirrored left-right with probability 1/2
    when `flip` (never mirrored otherwise).

    (B, C, H, W) -> (B, C, H, W), same dtype; the result has channels-last strides, which the
    convolution kernels prefer on CUDA.
    """
    batch, _channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    mirror = torch.randint(0, 2, (batch,), generator=generator, device=device).bool()
    mirror = mirror & flip  # the draw is made either way, so crop and crop_flip share offsets
    rows = offset_y[:, None] + torch.arange(height, device=device)  # (B, H)
    columns = offset_x[:, None] + torch.arange(width, device=device)  # (B, W)
    columns = torch.where(mirror[:, None], columns.flip(1), columns)  # a mirror reads columns backwards
    batch_index = torch.arange(batch, device=device)[:, None, None]  # (B, 1, 1)
    windows = padded[batch_index, :, rows[:, :, None], columns[:, None, :]]  # (B, H, W, C)
    return windows.permute(0, 3, 1, 2)  # (B, C, H, W)
