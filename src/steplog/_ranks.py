"""Where this process stands in a distributed job, read from the launcher's environment.

The one place steplog decides which rank it is: the framework integrations and ``start_run`` read
it here, so a launcher added once is known everywhere. Only the environment is read: no
``torch.distributed``, no MPI import, no communication between ranks.

Launchers, in the order they are tried (the first whose variables are set wins, so ``torchrun``
started inside a SLURM allocation is read as torchrun)::

    torchrun / torch.distributed   RANK, WORLD_SIZE, LOCAL_RANK
    SLURM (srun)                   SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
    Open MPI                       OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
    MPICH / Intel MPI (PMI)        PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from ._errors import InvalidValueError

__all__ = ["LAUNCHERS", "Ranks", "detect_ranks"]

# (launcher, rank variable, world-size variable, local-rank variable)
LAUNCHERS: tuple[tuple[str, str, str, str], ...] = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Ranks:
    """This process's place in its job: ``rank`` of ``world_size``, ``local_rank`` on its node.

    ``launcher`` names the environment it was read from (``"torchrun"``, ``"slurm"``,
    ``"openmpi"``, ``"pmi"``), or is None for a single process started without a launcher.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str | None = None

    @property
    def is_zero(self) -> bool:
        """True on the process that writes in ``ranks="zero"`` mode (rank 0, or no launcher)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a launcher started more than one process."""
        return self.world_size > 1


def _int_var(environ: Mapping[str, str], name: str, launcher: str) -> int:
    raw = environ[name].strip()
    try:
        return int(raw, 10)
    except ValueError:
        raise InvalidValueError(
            f"environment variable {name}={environ[name][:40]!r} (set by {launcher}) is not allowed: "
            "it must be a non-negative integer"
        ) from None


def detect_ranks(environ: Mapping[str, str] | None = None) -> Ranks:
    """Read rank, world size and local rank from the first launcher environment found.

    Args:
        environ: the environment to read (default: ``os.environ``).

    Returns:
        ``Ranks()`` (rank 0 of 1, launcher None) when no launcher's rank variable is set.

    Raises:
        InvalidValueError: a launcher's variables are set but are not integers, the world size
            is missing or below 1, or the rank is not below the world size (the message names
            the variable); a garbled environment is refused rather than guessed, since a wrong
            guess makes every rank write, or none.
    """
    env = os.environ if environ is None else environ
    for launcher, rank_var, size_var, local_var in LAUNCHERS:
        if rank_var not in env:
            continue
        rank = _int_var(env, rank_var, launcher)
        if size_var not in env:
            raise InvalidValueError(
                f"environment variable {rank_var} is set (by {launcher}) but {size_var} is not: "
                "both are needed to tell the ranks apart"
            )
        world_size = _int_var(env, size_var, launcher)
        if world_size < 1:
            raise InvalidValueError(f"environment variable {size_var}={world_size} is not allowed: it must be >= 1")
        if not 0 <= rank < world_size:
            raise InvalidValueError(
                f"environment variable {rank_var}={rank} is not allowed: it must be in [0, {size_var}={world_size})"
            )
        local_rank = _int_var(env, local_var, launcher) if local_var in env else 0
        if local_rank < 0:
            raise InvalidValueError(f"environment variable {local_var}={local_rank} is not allowed: it must be >= 0")
        return Ranks(rank=rank, world_size=world_size, local_rank=local_rank, launcher=launcher)
    return Ranks()
