"""`python -m artscale.cluster node|finished|merge ...`: what the sbatch scripts run on the nodes."""

import sys

from artscale.cluster.slurm import main

sys.exit(main())
