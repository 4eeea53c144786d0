"""cogview-ray: batch rendering of CogView3-Plus on Ray."""
__version__ = "0.1.0"
