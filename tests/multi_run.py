"""`python tests/multi_run.py RUNS.json` under torchrun: several `adapt.train` runs in one launch, as a list of
override lists, because each launch costs seconds of process start-up and imports."""

import json
import sys

import adapt
from adapt.config import load_config

if __name__ == "__main__":
    for overrides in json.loads(open(sys.argv[1]).read()):
        adapt.train(load_config(None, overrides))
