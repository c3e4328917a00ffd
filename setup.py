"""ssl_us: self-supervised contrastive pretraining on ultrasound video (JAX/Flax)."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "numpy>=1.26,<3",
    "jax>=0.8,<0.11",
    "flax>=0.11,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "grain>=0.2.12,<0.3",
    "tensorflow-cpu>=2.18,<2.22",
    "tensorflow-datasets>=4.9.8,<4.10",
    "ml-collections>=1.0,<1.2",
    "clu>=0.0.12,<0.1",
    "tensorboard>=2.18,<3",  # clu's TensorBoard writer imports it
    "av>=13,<19",
    "pydicom>=3.0,<3.1",
    "pylibjpeg>=2.0,<3",
    "pylibjpeg-libjpeg>=2.1,<3",
    "pillow>=10,<14",
    "scipy>=1.11,<2",
    "scikit-learn>=1.4,<2",
    "matplotlib>=3.8,<4",
    "tqdm>=4.66,<5",
    "google-crc32c>=1.5,<2",  # data_prep's TFRecord writer
]

setup(
    name="ssl_us",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["ssl_us", "ssl_us.*", "data_prep", "data_prep.*", "configs", "configs.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        # PyTorch only for the side-by-side benchmark (CPU build).
        "bench": ["torch==2.13.0"],
        # data_prep --runner beam. Beam 2.60+ allows protobuf 6 (TF 2.18-2.21 need >= 5.28 /
        # 6.31), numpy 2 and pyarrow < 26 (tensorflow-datasets takes any).
        "beam": ["apache-beam>=2.60,<3"],
    },
)
