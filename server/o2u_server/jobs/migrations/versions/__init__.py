"""One module per schema revision, applied in order by `o2u_server.jobs.migrate`."""
