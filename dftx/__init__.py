"""
dftx: Dragonflow's distribution layer on Twisted.

The NB database driver over Redis Cluster (L{dftx.db}), the publish/subscribe
drivers that carry NB changes to compute nodes (L{dftx.pubsub}), the OVSDB
port monitor (L{dftx.ovsdb}), and the services built from them.
"""

__version__ = "0.1.0.dev0"
