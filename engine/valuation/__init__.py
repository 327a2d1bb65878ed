"""The math of a value: label states to scores, references, the preconditioner, rankings."""
