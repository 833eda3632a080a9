import re

from setuptools import find_packages, setup

# One version: dftx.__version__ (dftx --version, /v1/status, dftx_build_info).
with open("dftx/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)

setup(
    name="dftx",
    version=VERSION,
    description="Twisted-native distribution layer for SDN controllers "
    "(Dragonflow's NB DB, pub/sub and OVSDB monitor on Redis Cluster and ZeroMQ)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # Tested: CPython 3.11 (the whole suite), 3.12 and 3.13 (the tests that
    # start no server); Linux; Redis 7.0 and Valkey 9.1 (doc/redis.md).
    python_requires=">=3.11",
    classifiers=[
        "Framework :: Twisted",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Programming Language :: Python :: Implementation :: CPython",
        "Topic :: System :: Networking",
    ],
    packages=find_packages(include=["dftx", "dftx.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/dftx_plugins.py"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "pyzmq>=25",
        "hiredis>=2.1",
        "msgpack>=1.0",
        "service-identity>=24.1",
        "zope.interface>=6",
        "prometheus_client>=0.20",
    ],
    entry_points={"console_scripts": ["dftx = dftx.cli:main"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            "treq>=24.9",
            "sphinx>=9.0",
            "myst-parser>=5.0",
        ],
        "bench": [
            "redis>=5",
            "txredisapi>=1.4.10",
            "coredis>=4",
            "pyzmq>=25",
            "ovs>=3",
        ],
    },
)
