"""spark-submit entry point: spark-submit jobs/retrain.py --conf conf/fashion_cnn.yaml [--set k=v] [--summary out.json]"""

import sys

from dlpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
