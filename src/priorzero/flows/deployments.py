"""Deployments of the priorzero flow, one per shipped config: priorzero/zork, priorzero/detective, priorzero/debug.

Two ways to run them:
- `priorzero deploy --pool NAME` registers them with a Prefect *process work pool* (made if missing); any number
  of `prefect worker start --pool NAME` processes, on any machine with this package installed, run their flow
  runs. The entrypoint is the module `priorzero.flows.priorzero_flow:priorzero` (not a file path), so it does not
  depend on where the worker was started; each flow run works in the directory `priorzero deploy` ran in (its
  `runs/` and `mlruns/`) unless `--working-dir` says otherwise.
- `priorzero serve` registers them and runs their flow runs from that one process (no pool, no worker).

Each deployment runs one flow run at a time (`concurrency_limit=1`: a second run waits for the first), is tagged
`priorzero` and its config name, and is versioned by the package version and the git commit of the code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
from uuid import UUID

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from priorzero.flows.priorzero_flow import priorzero
from priorzero_core.config import DEFAULT_ROM_DIR_ENV

DEPLOYMENTS = ("zork", "detective", "debug")  # deployment name = config name in configs/
DESCRIPTIONS = {
    "zork": "Zork 1 from the Jericho suite (needs the ROM: game.rom_dir or $PRIORZERO_ROM_DIR)",
    "detective": "Detective from the Jericho suite (needs the ROM: game.rom_dir or $PRIORZERO_ROM_DIR)",
    "debug": "The embedded TextWorld game at debug sizes: the whole loop in minutes, no ROM",
}


def code_version() -> str:
    """The package version, with the git commit of the checkout it runs from when there is one."""
    from priorzero.tasks.tracking import package_version, source_tags

    base = package_version()
    commit = source_tags().get("mlflow.source.git.commit")
    return f"{base}+g{commit[:12]}" if commit else base


def deployments(job_variables: Optional[dict] = None,
                entrypoint_type: EntrypointType = EntrypointType.FILE_PATH) -> list[RunnerDeployment]:
    version = code_version()
    return [priorzero.to_deployment(name=name, parameters={"config": name}, concurrency_limit=1,
                                    tags=["priorzero", name], version=version, description=DESCRIPTIONS[name],
                                    job_variables=job_variables, entrypoint_type=entrypoint_type)
            for name in DEPLOYMENTS]


def deploy_to_pool(pool: str, working_dir: Path) -> list[UUID]:
    """Register the deployments with process work pool `pool` (made if missing); flow runs start in `working_dir`
    with this shell's $PRIORZERO_ROM_DIR, if set. Returns the deployment ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
            if found.type != "process":
                raise ValueError(f"work pool {pool!r} is a {found.type!r} pool; priorzero deploys to process pools")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    env = {DEFAULT_ROM_DIR_ENV: os.environ[DEFAULT_ROM_DIR_ENV]} if os.environ.get(DEFAULT_ROM_DIR_ENV) else {}
    variables = {"working_dir": str(working_dir.resolve()), **({"env": env} if env else {})}
    return [d.apply(work_pool_name=pool) for d in deployments(variables, EntrypointType.MODULE_PATH)]


def serve_deployments(poll_seconds: float = 10.0, limit: Optional[int] = None) -> None:
    """Register the deployments and run their flow runs from this process until stopped.

    poll_seconds is how often the runner asks the server for new runs, which is most of a run's start latency
    (the same as PREFECT_RUNNER_POLL_FREQUENCY). A stopped server pauses the deployments; runs triggered
    meanwhile wait in Scheduled until `priorzero serve` runs again.
    """
    serve(*deployments(), query_seconds=poll_seconds, limit=limit)
