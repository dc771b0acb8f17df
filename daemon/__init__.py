"""retraind: a daemon that turns folders of images into a live, self-improving image classifier."""

__version__ = "0.1.0"
