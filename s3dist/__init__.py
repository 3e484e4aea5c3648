"""s3dist: expert-parallel training of S3 multimodal Mixture-of-Experts encoders."""

__version__ = "0.1.0"
