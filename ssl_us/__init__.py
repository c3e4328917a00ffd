"""ssl_us: self-supervised contrastive pretraining on ultrasound video, in JAX/Flax."""
__version__ = "0.1.0"
