"""`smolcord simulate`: a simulated community voting by a hidden rule, to show that the loop learns."""
