"""
How publishers find each other: registration rows in the NB database, laid
out so that Dragonflow shares them (checked against its code at commit
4dc36ed6).

Every publisher keeps a row in table C{dftx_publisher} under its role as
topic (C{{dftx_publisher.neutron_server}id},
C{{dftx_publisher.df_local_controller}id}); a publisher of role
neutron_server also keeps one in Dragonflow's table C{publisher}
(C{{publisher.}id}) with only the fields of Dragonflow's C{Publisher}
model, as Dragonflow's df-publisher-service writes it for itself.  So
Dragonflow's controllers find dftx's publisher services and nothing of
dftx's controllers, and dftx's controllers find Dragonflow's publisher
services (a row of table C{publisher} is a neutron_server publisher).
L{dftx.registry.rows} has the layout, the reads and the stale cleanup.

L{Registration} keeps a publisher's rows (written, refreshed every
C{timeout / 3}, deleted at stop, creation and deletion announced);
L{Discovery} connects a subscriber to the live publishers of the other
role, reading only their rows, and acts on announcements at once.
"""

from dftx.registry.discovery import Discovery
from dftx.registry.registration import Registration
from dftx.registry.rows import (
    DFTX_PUBLISHER_TABLE, PUBLISHER_TABLE, PublisherRow, other_role, read_rows, remove_stale,
)

__all__ = [
    "DFTX_PUBLISHER_TABLE", "PUBLISHER_TABLE", "Discovery", "PublisherRow", "Registration",
    "other_role", "read_rows", "remove_stale",
]
