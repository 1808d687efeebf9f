"""
The node registry in the store: ``records`` holds the record format and the
one reader of records, which the client library shares; ``service`` holds a
node's presence there (the `Registry` service). Nothing is imported here, so
the client can read records without the node's machinery.
"""
