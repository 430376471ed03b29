"""Deployments of the priorzero flow, one per shipped config, served from one process (no work pool)."""

from __future__ import annotations

from typing import Optional

from prefect import serve

from priorzero.flows.priorzero_flow import priorzero

DEPLOYMENTS = ("zork", "detective", "debug")  # deployment name = config name in configs/


def serve_deployments(poll_seconds: float = 10.0, limit: Optional[int] = None) -> None:
    """Register priorzero/zork, priorzero/detective and priorzero/debug and run their flow runs until stopped.

    poll_seconds is how often the runner asks the server for new runs, which is most of a run's start latency
    (the same as PREFECT_RUNNER_POLL_FREQUENCY). A stopped server pauses the deployments; runs triggered
    meanwhile wait in Scheduled until `priorzero serve` runs again.
    """
    serve(
        *(priorzero.to_deployment(name=name, parameters={"config": name}) for name in DEPLOYMENTS),
        query_seconds=poll_seconds,
        limit=limit,
    )
