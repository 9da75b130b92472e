"""Package discovery for the fixed layout: fastpref/, csrc_triton/ (kernels) and bench/ (the suite)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastpref", "fastpref.*", "csrc_triton", "csrc_triton.*", "bench", "bench.*"]),
    package_data={"fastpref": ["data/*.jsonl"]},
)
