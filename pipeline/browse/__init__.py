"""`m2t browse`: a local web page over an archive."""
