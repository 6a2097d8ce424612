"""Pool of Experts: ``from PoE import Pool; model = Pool.open("DB_PoE").query(["people", "vehicles_1"])``."""

from PoE.pool import Pool

__all__ = ["Pool"]
