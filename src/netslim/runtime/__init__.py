"""Where a run computes: the device and precision (:mod:`.device`), torchrun's processes
(:mod:`.distributed`) and the CPU threads (:mod:`.threads`). Below the data and the engine,
so that anything may ask where it runs."""
