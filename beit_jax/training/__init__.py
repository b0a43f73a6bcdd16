"""Trainer machinery shared by every task: mesh, train state, optimizer, losses,
checkpoints, metrics, the run's workdir, multi-process start-up, the step loop."""
