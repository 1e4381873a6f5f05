"""Hydra launcher ``caco_slurm``: hydra-submitit-launcher's SLURM launcher that returns once
the sweep is submitted (``wait: false``) instead of blocking until every job ends."""
