"""Where pickles made before the move to rooms look for the envelopes and the report
(``batchkit._outcomes``).

Pickles made since name ``batchkit.Success`` and so on; this module only lets older ones load
(``tests/model/test_pickles.py`` loads a fixture made by the old layout). Import from ``batchkit``.
"""

from ._model.outcomes import Failure as Failure
from ._model.outcomes import Success as Success
from ._model.report import BatchReport as BatchReport
from ._model.report import LimitChange as LimitChange
from ._model.report import _rebuild_report as _rebuild_report

__all__: list[str] = []
