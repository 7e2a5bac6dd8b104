"""batch-supervisor: a durable batch-job daemon on PostgreSQL.

Handlers import what they need from here: :class:`Item`, :class:`PermanentError`
and :class:`RetryAfter`.
"""

from supervisor.errors import PermanentError, RetryAfter
from supervisor.models import Item

__all__ = ["Item", "PermanentError", "RetryAfter", "__version__"]
__version__ = "0.1.0"
