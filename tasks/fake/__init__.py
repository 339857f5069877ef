"""The offline world: synthetic lesions, synthetic wide-field photos and a local ISIC-compatible server."""
