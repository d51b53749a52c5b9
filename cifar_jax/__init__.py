"""cifar_jax: ResNets on CIFAR-10 and functional Grad-CAM in JAX/Flax."""

__version__ = "0.1.0"
