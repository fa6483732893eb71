"""ScarWatch: monthly aerial change detection against illegal construction and city scars."""

__version__ = "0.1.0"
