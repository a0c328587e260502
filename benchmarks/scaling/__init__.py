"""The scale-out benchmark in three steps: ``measure`` (raw points), ``fit`` (the cost
model, held-out checks, extrapolation) and ``page`` (docs/scaling.md)."""
