"""Training machinery shared by the commands in ``jobs/``: config, launch, the worker's trainer,
checkpoints, run storage, metrics, optimizer, probes, pictures. Nothing here imports a command."""
