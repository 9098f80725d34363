"""The nvmet configuration tree (see `nvmet_p2p.configfs`, its public entry point)."""
