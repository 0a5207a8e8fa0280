"""Pretrain the default teacher and the student's starting point (supervised, cached).

    python jobs/pretrain.py --config conf/default.yaml [--force] [key=value ...]

Same as `kdtw pretrain`. Models land in <models_dir>/teacher and <models_dir>/student.
"""

import sys

from kdtw.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
