"""spark-submit entry point: spark-submit jobs/recommend.py --conf conf/movielens_rbm.yaml [--model URI] [--k 10] [--summary out.json]
(every user's top-k into <name>_recommendations; --user U for one user's list)"""

import sys

from dlpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["recommend", *sys.argv[1:]]))
