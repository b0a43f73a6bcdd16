"""Jobs selected by `config.task` in `beit_jax.main`."""
