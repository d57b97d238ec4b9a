"""`artscale report`: a static HTML page of a run dir or an output dir."""
