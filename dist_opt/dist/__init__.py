"""Process-group plumbing: launcher environment, joining the group, collectives with a traffic ledger."""
