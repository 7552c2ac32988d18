"""The operator surface's PostgreSQL access: lookups, listings, figures and repair actions;
its statements, rows, records and filters."""
