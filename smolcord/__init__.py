"""smolcord: a Discord assistant that sees images and learns from its users' votes."""

__version__ = "0.1.0"
