"""Package layout: the repository keeps its kernels in csrc_triton/ and its benchmark suite in bench/,
but both install under fastpref's namespace (fastpref.kernels, fastpref.bench), so a wheel adds only
the top-level import name ``fastpref``."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastpref", "fastpref.*"]) + ["fastpref.kernels", "fastpref.bench"],
    package_dir={"fastpref.kernels": "csrc_triton", "fastpref.bench": "bench"},
    package_data={"fastpref": ["data/*.jsonl"]},
)
