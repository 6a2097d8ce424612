"""Phase one, run once: the Oracle, the library and one expert per task (conditional distillation), the in-place
edits of a pool, and the baselines the paper compares with."""
