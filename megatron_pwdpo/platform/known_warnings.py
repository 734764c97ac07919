"""Third-party warnings that say nothing about a run, kept out of its output.

Each is filtered by category AND module AND message, never by a blanket ignore, and only
when the user chose no warning filters of their own: with ``-W`` or ``PYTHONWARNINGS``
(both land in ``sys.warnoptions``) Python's filters stay exactly as the user set them.
The command line installs them first thing in ``main`` and in every spawned helper
process (which imports the command line module as its main module).
"""

from __future__ import annotations

import sys
import warnings

# (category, module regex, message regex), each seen in a real run on CPU.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"megatron\.core(\..*)?", r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"megatron\.core(\..*)?", r"Apex is not installed"),
    (UserWarning, r"megatron\.core\.transformer\.transformer_config", r"full scope is deprecated"),
    (DeprecationWarning, r"megatron\.core(\..*)?", r"The following imports from"),
    (DeprecationWarning, r"torch\.jit\._script", r"`torch\.jit\.script_method` is deprecated"),
    (
        FutureWarning,
        r"megatron\.core\.dist_checkpointing\.strategies\.torch",
        r"`load_state_dict` is deprecated",
    ),
    (
        FutureWarning,
        r"torch\.distributed\.checkpoint(\..*)?",
        r"Please use DTensor instead and we are deprecating ShardedTensor",
    ),
)


def quiet_known_warnings() -> bool:
    """Ignore `KNOWN_WARNINGS`, unless the user chose warning filters (``-W`` or
    ``PYTHONWARNINGS``, both in ``sys.warnoptions``): theirs then win, untouched.

    Returns:
        Whether the filters were installed.
    """
    if sys.warnoptions:
        return False
    for category, module, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    return True
