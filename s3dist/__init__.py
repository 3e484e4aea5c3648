"""s3dist: expert-parallel training of S3 multimodal Mixture-of-Experts encoders."""

__version__ = "0.1.0"

# Exit code of a training process that checkpointed on a pre-emption signal (SIGUSR2 / SIGTERM) and
# asks to be run again with --resume auto (EX_TEMPFAIL). Launchers and SLURM scripts test for it.
EXIT_REQUEUE = 75
