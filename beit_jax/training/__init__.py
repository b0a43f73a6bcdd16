"""Trainer machinery shared by every task: mesh, optimizer, checkpoints, metrics, loop."""
