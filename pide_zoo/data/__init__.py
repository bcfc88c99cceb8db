"""Dataset preparation and loading shared by the tools."""
