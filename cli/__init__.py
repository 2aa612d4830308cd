"""The parscale-export command line: a thin Typer layer over the parscale_export library."""
