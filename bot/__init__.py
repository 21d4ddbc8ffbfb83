"""The Discord bot: chat, reactions, slash commands and scheduling (never imports torch)."""
