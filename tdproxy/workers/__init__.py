"""Several data-plane processes behind one control plane (``workers: N``); see supervisor.py."""
