"""HoReN Server: the HTTP service around horen_core (settings, the device worker, persistence, index).
Imports are lazy so `horen eval` works without the service extras."""
