"""One exception hierarchy for the whole system.

Services subclass :class:`InspectionError` in their own packages; what more than one
package raises (bad options, images, heads, the broker) is defined here, in the base. Every message names the file,
product, backbone or option that was wrong, so a user never has to read a
traceback from deep inside torch. Messages repeat user input through :func:`quoted`, which cuts it short.

``exit_code`` is what the CLI exits with: 2 when the user gave something wrong (an option, a file, a dataset —
the same code argparse uses for usage errors), 3 when something failed at run time (the broker, a head, the
calibrator's server side). Scripts can tell "fix your command" from "try again".
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_RUNTIME = 3
ECHO_LIMIT = 64  # characters of user input a message repeats; more is cut (a 10 kB id must not come back whole)


def cut(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as it is, or its first ``limit`` characters and its length: user input in a message stays short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def quoted(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr`` of user input for an error message, cut to ``limit`` characters with the full length named."""
    if not isinstance(value, str):
        return cut(repr(value), limit)
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} chars)"


class InspectionError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = EXIT_RUNTIME


class ConfigError(InspectionError, ValueError):
    """An option or flag has an invalid value."""

    exit_code = EXIT_USAGE


class ImageError(InspectionError):
    """An image or mask cannot be read or does not fit its partner."""

    exit_code = EXIT_USAGE


class DatasetError(InspectionError):
    """A dataset folder does not follow the MVTec AD layout or lacks what is needed."""

    exit_code = EXIT_USAGE


class BackboneError(InspectionError):
    """A backbone spec is unknown or its weights cannot be loaded."""

    exit_code = EXIT_USAGE


class HeadError(InspectionError):
    """A head artifact is invalid, corrupt or built for another backbone."""

    exit_code = EXIT_USAGE


class KafkaError(InspectionError):
    """The broker cannot be reached or refused a request."""
