"""One cog per feature: chat, feedback, privacy, admin."""
