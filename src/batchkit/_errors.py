"""Where pickles made before the move to rooms look for the errors (``batchkit._errors``).

Pickles made since name ``batchkit.ItemTimeout`` and so on; this module only lets older ones
load (``tests/model/test_pickles.py`` loads a fixture made by the old layout). Import from
``batchkit``.
"""

from ._model.errors import BatchkitError as BatchkitError
from ._model.errors import InvalidArgument as InvalidArgument
from ._model.errors import ItemCancelled as ItemCancelled
from ._model.errors import ItemError as ItemError
from ._model.errors import ItemSkipped as ItemSkipped
from ._model.errors import ItemTimeout as ItemTimeout
from ._model.errors import MissingExtra as MissingExtra
from ._model.errors import RemoteError as RemoteError
from ._model.errors import _rebuild as _rebuild
from ._model.report import InputFailed as InputFailed

__all__: list[str] = []
