"""KV-cache compression methods behind one cache interface (policy + packed segment storage).

Importing this package registers every method. A new method is one file here plus its import below.
"""

from methods import (  # noqa: F401  (registration)
    full,
    h2o,
    kivi,
    mikv,
    pyramidkv,
    qaq,
    random_evict,
    recency,
    snapkv,
    streaming,
    tova,
)
from methods.base import BudgetViolation, Method, SpecError
from methods.registry import REGISTRY, describe, parse_spec, parse_specs

__all__ = ["REGISTRY", "BudgetViolation", "Method", "SpecError", "describe", "parse_spec", "parse_specs"]
