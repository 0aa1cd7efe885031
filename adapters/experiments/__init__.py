"""The experiments file: the registry's source (:class:`~worker.service.ports.ExperimentSource`).

:func:`load_registry` reads one file once; :class:`ReloadingRegistry` serves the newest good one and
picks up edits. The model they build is the domain's (:mod:`worker.domain.registry`).
"""

from adapters.experiments.file import MAX_ALIAS_EXPANSION, MAX_CONFIG_BYTES, load_registry, read_document
from adapters.experiments.watch import ReloadingRegistry

__all__ = ["MAX_ALIAS_EXPANSION", "MAX_CONFIG_BYTES", "ReloadingRegistry", "load_registry", "read_document"]
