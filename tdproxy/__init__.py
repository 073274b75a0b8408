"""tdproxy: a Traffic Distributor, the weighted HTTP reverse proxy in front of your environments."""

__version__ = "0.1.0"
