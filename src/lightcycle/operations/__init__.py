"""Operations: the team tracking server, its PostgreSQL cluster, and `make demo`."""
