"""HTTP: the server clients talk to, and the client guests send requests with."""
