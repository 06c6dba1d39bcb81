"""Learning-rate schedules as pure functions of the epoch, in the style of nanoGPT's `get_lr`.

O2U-Net's stage 2 cycles the learning rate from high (the network underfits and mislabeled
samples keep a high loss) to low (it fits, and starts to memorize them) once every `c` epochs;
averaging each sample's loss over those states is what separates hard-but-clean samples from
mislabeled ones. Keeping the schedule a pure function makes it testable against hand-computed
values and makes a resumed run use exactly the rates an uninterrupted one would.
"""

from __future__ import annotations


def constant_lr(epoch: int, rate: float) -> float:
    """Stage 1's fixed learning rate, as a schedule."""
    del epoch
    return rate


def cyclic_lr(epoch: int, cycle_length: int, r1: float, r2: float) -> float:
    """Learning rate of cyclic epoch `epoch` (1-based) for cycle length `cycle_length` epochs.

    `s(t) = (1 + ((t - 1) mod c)) / c` and `r(t) = (1 - s(t)) * r1 + s(t) * r2`, so every cycle
    moves linearly from just below `r1` to exactly `r2` on its last epoch.
    """
    if epoch < 1 or cycle_length < 1:
        raise ValueError(f"epoch and cycle_length must be >= 1, got {epoch} and {cycle_length}")
    s = (1 + ((epoch - 1) % cycle_length)) / cycle_length
    return (1 - s) * r1 + s * r2


def linear_decay_lr(epoch: int, epochs: int, start: float, end: float) -> float:
    """Learning rate of epoch `epoch` (1-based) of `epochs`, falling linearly from `start` to `end`.

    Used by stage 3, whose two models are trained to convergence so their accuracies compare.
    """
    if epoch < 1 or epoch > epochs:
        raise ValueError(f"epoch must be in [1, {epochs}], got {epoch}")
    if epochs == 1:
        return end
    fraction = (epoch - 1) / (epochs - 1)
    return (1 - fraction) * start + fraction * end
