"""
The local ovsdb-server, monitored: RFC 7047 JSON-RPC (L{dftx.ovsdb.jsonrpc}),
port classification (L{dftx.ovsdb.ports}) and the Interface table monitor
(L{dftx.ovsdb.monitor}).
"""
