"""spark-submit entry point: spark-submit jobs/embed.py --conf conf/fashion_cnn.yaml [--model models:/<name>@<alias>] [--set k=v] [--summary out.json]"""

import sys

from dlpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
