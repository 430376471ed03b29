"""PriorZero's command line (`priorzero.cli`), its Prefect flow and deployments (`priorzero.flows`) and the flow's
tasks with MLflow tracking (`priorzero.tasks`). The training itself is `priorzero_core`, usable without them."""
