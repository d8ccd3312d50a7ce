"""camrt: visual explanations of image models, computed where they are deployed."""

__version__ = "0.1.0"
