"""YAML merge recipes: the pydantic schema, loading with line numbers, parameters and sweeps."""
