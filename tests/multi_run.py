"""`python tests/multi_run.py RUNS.json [PID_DIR]` under torchrun: several `adapt.train` runs in one launch, as a
list of override lists, because each launch costs seconds of process start-up and imports. Each rank writes its
process id to PID_DIR/RANK, for a test that kills one."""

import json
import os
import sys
from pathlib import Path

import adapt
from adapt.config import load_config

if __name__ == "__main__":
    if len(sys.argv) > 2:
        (Path(sys.argv[2]) / os.environ["RANK"]).write_text(str(os.getpid()))
    for overrides in json.loads(Path(sys.argv[1]).read_text()):
        adapt.train(load_config(None, overrides))
