"""Where pickles made before the move to rooms look for a report's column store
(``batchkit._store``): a pickled :class:`~batchkit.BatchReport` holds its columns.

Pickles made since name ``batchkit._model.store``; this module only lets older ones load
(``tests/model/test_pickles.py`` loads a fixture made by the old layout).
"""

from ._model.store import OutcomeStore as OutcomeStore
from ._model.store import OutcomeView as OutcomeView

__all__: list[str] = []
