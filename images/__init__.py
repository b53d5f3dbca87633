"""The appliance OS image (images/README.md); built by ``python -m images.build``."""
