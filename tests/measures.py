"""What two runs that trained alike may still differ in: measurements of the machine, not of the training."""


def wall_clock(key: str) -> bool:
    """Metrics that measure time, caches (cold after a restart) or the machine (MLflow's system metrics)."""
    return (key.startswith(("timing/", "system/")) or key.endswith(("_per_s", "_s", "seconds"))
            or "cache_hit_rate" in key)
