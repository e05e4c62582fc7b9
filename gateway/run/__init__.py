"""Running scangate: the command line (``cli``), the process supervisor (``server``) and the
embedded Valkey server (``embedded``)."""
