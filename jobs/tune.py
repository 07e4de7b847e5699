"""spark-submit entry point: spark-submit jobs/tune.py --conf conf/fashion_cnn.yaml --space conf/fashion_cnn.space.yaml [--set k=v] [--summary out.json]"""

import sys

from dlpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
