"""How much one calibrator takes on at once, so hostile or idle clients get a clear refusal instead of all of it.

One declaration per option: :class:`ServiceLimits` holds the defaults, :func:`add_limit_args` turns each field into
a flag (and so a ``CFF_INSPECT_<OPTION>`` variable), :func:`limits_from` reads them back. Kept free of torch and
grpc so the command line can be built without loading either.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from inspection_core.errors import ConfigError

READ_RESERVE = 2  # gRPC handler threads FitHead may never take: ListHeads, DownloadHead and health always get one


@dataclass(frozen=True)
class ServiceLimits:
    """Thread, fit and upload limits of the gRPC service (see each flag's help)."""

    grpc_threads: int = 8
    max_fits: int = 1
    fit_queue: int = 2
    fit_idle_s: float = 30.0
    max_fit_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        if self.max_fits < 1 or self.fit_queue < 0:
            raise ConfigError(f"--max-fits must be >= 1 and --fit-queue >= 0, got {self.max_fits} and {self.fit_queue}")
        if self.fit_slots > self.grpc_threads - READ_RESERVE:
            raise ConfigError(
                f"--max-fits {self.max_fits} + --fit-queue {self.fit_queue} FitHead streams would leave fewer than "
                f"{READ_RESERVE} of --grpc-threads {self.grpc_threads} for ListHeads, DownloadHead and health: "
                f"raise --grpc-threads to at least {self.fit_slots + READ_RESERVE}"
            )
        if not self.fit_idle_s > 0:
            raise ConfigError(f"--fit-idle-s must be > 0 seconds, got {self.fit_idle_s}")
        if self.max_fit_pixels < 1:
            raise ConfigError(f"--max-fit-pixels must be >= 1, got {self.max_fit_pixels}")

    @property
    def fit_slots(self) -> int:
        """FitHead streams admitted at once (uploading, waiting or fitting); more are refused at once."""
        return self.max_fits + self.fit_queue


DEFAULT_LIMITS = ServiceLimits()
_HELP = {
    "grpc_threads": "gRPC handler threads; FitHead streams never take the last {reserve} (default %(default)s)",
    "max_fits": "fits computed at once; each holds its references and the backbone's activations in memory "
    "(default %(default)s)",
    "fit_queue": "further FitHead streams that may upload or wait for a fit; more are refused with "
    "RESOURCE_EXHAUSTED (default %(default)s)",
    "fit_idle_s": "abort a FitHead upload that sends nothing for this many seconds (default %(default)s)",
    "max_fit_pixels": "pixels all references of one fit may have together, read from their headers "
    "(default %(default)s)",
}


UNSIGNED_HELP = (
    "announce heads unsigned when there is no --heads-key-file: anyone who can write the heads topic can then "
    "announce heads the workers take as this calibrator's (only where workers also run --allow-unsigned-heads); "
    "logs a warning"
)


def refuse_unsigned(has_key: bool, allow_unsigned: bool) -> None:
    """A calibrator that announces heads signs them unless unsigned announcements were explicitly allowed, as a
    worker refuses to follow them without a key (secure by default on both sides)."""
    if not has_key and not allow_unsigned:
        raise ConfigError(
            "the calibrator announces heads on Kafka but has no heads key: give it one with --heads-key-file "
            "(env CFF_INSPECT_HEADS_KEY_FILE; the workers verify with the same file), --no-kafka to announce "
            "nothing, or --allow-unsigned-heads (env CFF_INSPECT_ALLOW_UNSIGNED_HEADS=1) to announce unsigned"
        )


def add_limit_args(p: argparse.ArgumentParser) -> None:
    for f in fields(ServiceLimits):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=int if f.type in (int, "int") else float,
            default=getattr(DEFAULT_LIMITS, f.name),
            help=_HELP[f.name].format(reserve=READ_RESERVE),
        )


def limits_from(args: argparse.Namespace) -> ServiceLimits:
    return ServiceLimits(**{f.name: getattr(args, f.name) for f in fields(ServiceLimits)})
