"""s3dist: expert-parallel training of S3 multimodal Mixture-of-Experts encoders."""

__version__ = "0.1.0"

# Exit code of a training process that checkpointed on a pre-emption signal (SIGUSR2 / SIGTERM) and
# asks to be run again with --resume auto (EX_TEMPFAIL). Launchers and SLURM scripts test for it.
EXIT_REQUEUE = 75

__all__ = ["S3Encoder", "EXIT_REQUEUE", "__version__"]


def __getattr__(name: str):
    # `import s3dist` stays light (launchers and the CLI import it): the encoder brings torch and DeepSpeed.
    if name == "S3Encoder":
        from s3dist.pretrained import S3Encoder

        return S3Encoder
    raise AttributeError(f"module 's3dist' has no attribute {name!r}")
